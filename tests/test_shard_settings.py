"""The shard's own settings (ps/shard_settings.py) and its id-keyed tables as a service it owns
(ps/table_service.py), driven through the core as the servicer drives them."""
import dataclasses

import numpy as np
import pytest

from asyncps.config import load_config
from asyncps.protos.table_rows import TableGrad
from asyncps.ps.errors import FailedPrecondition, InvalidArgument, NotFound
from asyncps.ps.shard import Shard
from asyncps.ps.shard_settings import ShardSettings
from asyncps.ps.table_service import TableService
from cli_runner import CONFIGS

LINEAR = CONFIGS / "linear_regression.yaml"


def _cfg(*overrides: str):
    return load_config(LINEAR, ["cluster.workers=2", "cluster.ps=1", "optimizer.name=sgd", *overrides])


def test_settings_hold_what_a_shard_reads_and_are_frozen():
    cfg = _cfg("cluster.mode=ssp", "cluster.staleness_bound=3", "cluster.table_capacity=7",
               "cluster.table_eviction=lfu", "seed=11")
    s = ShardSettings.from_config(cfg)
    assert (s.workers, s.ps, s.seed, s.mode, s.staleness_bound) == (2, 1, 11, "ssp", 3)
    assert (s.table_capacity, s.table_eviction, s.staleness_policy, s.controlled, s.history_depth) == \
        (7, "lfu", "none", False, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 3  # type: ignore[misc]
    cfg.optimizer.learning_rate = 123.0  # a later change to the Config does not reach the settings
    assert s.optimizer.learning_rate != 123.0


def test_a_shard_is_built_alike_from_a_config_or_its_settings():
    cfg = _cfg("cluster.mode=ssp", "cluster.staleness_bound=3")
    for shard in (Shard(cfg, 1), Shard.from_config(cfg, 1), Shard(ShardSettings.from_config(cfg), 1)):
        assert shard.index == 1 and shard.mode == "ssp" and shard.consistency.bound == 3
        assert shard.settings == ShardSettings.from_config(cfg) and shard.num_workers == 2
        assert isinstance(shard.table_service, TableService)


def test_table_rows_through_the_core_and_its_service():
    shard = Shard.from_config(_cfg("optimizer.learning_rate=1.0"))
    shard.init({"w": np.zeros(2, np.float32)}, {"emb": 3})
    shard.register_worker(0)
    ids = np.array([5, 9], np.int64)
    version, values, rows = shard.pull(0, (), tables={"emb": ids})
    got_ids, first, versions = rows["emb"]
    assert version == 0 and list(versions) == [0, 0] and first.shape == (2, 3)
    grad = TableGrad(ids, np.ones((2, 3), np.float32), np.zeros(2, np.int64))
    assert shard.push(0, 1, 0, {"w": np.ones(2, np.float32), "emb": grad}).result == "APPLIED"
    _, _, after = shard.pull(None, (), tables={"emb": ids})
    np.testing.assert_array_equal(after["emb"][1], first - 1.0)
    assert list(after["emb"][2]) == [1, 1]
    [stats] = shard.stats(hot_ids=True)["tables"]
    assert (stats["name"], stats["rows"], stats["updates"], stats["hot_ids"]) == ("emb", 2, 1, [5, 9])
    with pytest.raises(NotFound):
        shard.pull(0, (), tables={"nope": ids})
    with pytest.raises(FailedPrecondition):  # a second Init must declare the same tables
        shard.init({"w": np.zeros(2, np.float32)}, {"emb": 4})

    # checkpoint: read by chunks, staged, installed by the next restore (the version comes back)
    updates, chunks = shard.table_chunks("emb", rows=1)
    saved = list(chunks)
    snap = shard.snapshot()
    other = Shard.from_config(_cfg("optimizer.learning_rate=1.0"))
    assert other.table_service.stage("emb", 3, updates, saved) == 2
    other.restore(snap)
    _, _, back = other.pull(None, (), tables={"emb": ids})
    np.testing.assert_array_equal(back["emb"][1], after["emb"][1])
    assert list(back["emb"][2]) == [1, 1] and other.tables["emb"].updates == 1


def test_tables_refuse_a_mode_they_do_not_train_with():
    shard = Shard.from_config(_cfg("cluster.mode=sync"))
    with pytest.raises(InvalidArgument, match="async or ssp"):
        shard.init({"w": np.zeros(2, np.float32)}, {"emb": 3})
