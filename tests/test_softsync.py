"""n-softsync on the shards (Zhang, Gupta, Lian & Liu, IJCAI 2016): one update per c = workers // n
gradients, averaged, each scaled by alpha/tau under `lr_scale`; staleness recorded per gradient."""
import numpy as np
import pytest

from asyncps.config import load_config
from asyncps.errors import ConfigError
from asyncps.ps.shard import Shard
from cli_runner import CONFIGS, report, run_ok

LINEAR = CONFIGS / "linear_regression.yaml"


def shard(workers: int, n: int, *extra: str) -> Shard:
    cfg = load_config(LINEAR, ["cluster.mode=softsync", f"cluster.workers={workers}", f"cluster.softsync_n={n}",
                               "optimizer.name=sgd", "optimizer.learning_rate=1.0", *extra])
    s = Shard(cfg)
    s.init({"w": np.zeros(1, np.float32)})
    for w in range(workers):
        s.register_worker(w)
    return s


def value(s: Shard) -> float:
    return float(s.pull(None)[1]["w"][0])


@pytest.mark.parametrize("workers, n, c", [(4, 1, 4), (4, 2, 2), (4, 4, 1), (8, 3, 2)])
def test_an_update_every_c_gradients(workers, n, c):
    s = shard(workers, n)
    results = [s.push(i % workers, i // workers, 0, {"w": np.ones(1, np.float32)}).result for i in range(2 * c)]
    assert results == (["ACCUMULATED"] * (c - 1) + ["APPLIED"]) * 2
    assert s.version == 2 and s.stats()["rounds"] == 2


def test_each_gradient_is_scaled_by_alpha_over_its_own_staleness():
    s = shard(4, 2, "optimizer.staleness_policy.name=lr_scale")  # c = 2
    s.push(0, 0, 0, {"w": np.full(1, 1.0, np.float32)})
    s.push(1, 0, 0, {"w": np.full(1, 1.0, np.float32)})  # tau 0, 0: alpha -> w = -1
    s.push(2, 0, 0, {"w": np.full(1, 4.0, np.float32)})  # read version 0, applied at version 1
    s.push(3, 0, 1, {"w": np.full(1, 2.0, np.float32)})
    # version 1 when the second pair is applied: taus 1 and 0 -> (4/1 + 2/1) / 2 = 3
    assert value(s) == pytest.approx(-1 - 3)
    s.push(0, 1, 0, {"w": np.full(1, 6.0, np.float32)})  # tau 2 -> 6 / 2 = 3
    s.push(1, 1, 2, {"w": np.full(1, 2.0, np.float32)})  # tau 0 -> 2
    assert value(s) == pytest.approx(-4 - (3 + 2) / 2)
    hist = s.stats()["histogram"]
    assert hist[:3] == [4, 1, 1]  # staleness recorded per gradient: 0,0 | 1,0 | 2,0


def test_softsync_limits_are_one_line():
    with pytest.raises(ConfigError, match="softsync_n must be at most workers"):
        load_config(LINEAR, ["cluster.mode=softsync", "cluster.workers=2", "cluster.softsync_n=3"])
    with pytest.raises(ConfigError, match="not softsync"):
        load_config(LINEAR, ["cluster.mode=softsync", "optimizer.staleness_policy.name=dcasgd"])


@pytest.mark.slow
def test_a_softsync_cluster_trains(tmp_path):
    run_ok("launch", LINEAR, f"run_dir={tmp_path}", "cluster.mode=softsync", "cluster.workers=2",
           "cluster.softsync_n=1", "train.max_steps=300", "train.eval_every=100", timeout=180)
    r = report(tmp_path)
    assert r["steps"] == 300 and abs(r["variables"]["linear.w"][0] - 2) < 0.05
    assert r["staleness"]["count"] == 2 * 300  # two gradients per update, each recorded
