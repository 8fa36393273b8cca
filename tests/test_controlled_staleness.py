"""Controlled staleness: seeded draws of r, and gradients computed on weights exactly r versions old."""
from collections import Counter

import grpc
import numpy as np
import pytest

from asyncps.cli.train import ControlledStaleness, train
from asyncps.config import StalenessConfig, load_config
from asyncps.errors import ConfigError
from asyncps.ps.optim import make_optimizer
from asyncps.runs import load_params
from asyncps.worker.delays import StalenessSampler, staleness_pmf
from cli_runner import CONFIGS

LINEAR = CONFIGS / "linear_regression.yaml"


@pytest.mark.parametrize("cfg, pmf", [
    (StalenessConfig(True, "constant", s=3), [0, 0, 0, 1]),
    (StalenessConfig(True, "uniform", s=3), [0.25] * 4),
    (StalenessConfig(True, "geometric", s=2, p=0.5), np.array([4, 2, 1]) / 7),
    (StalenessConfig(True, "histogram", histogram={0: 1, 3: 3}), [0.25, 0, 0, 0.75]),
])
def test_pmf_and_draws(cfg, pmf):
    np.testing.assert_allclose(staleness_pmf(cfg), pmf)
    sampler = StalenessSampler(cfg, seed=0)
    draws = np.array([sampler.draw() for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=len(pmf)) / len(draws), pmf, atol=0.015)
    assert abs(draws.mean() - sampler.mean) < 0.05


def test_same_seed_same_draws():
    cfg = StalenessConfig(True, "geometric", s=16, p=0.3)
    first = [StalenessSampler(cfg, 5).draw() for _ in range(1)]
    a, b, c = StalenessSampler(cfg, 5), StalenessSampler(cfg, 5), StalenessSampler(cfg, 6)
    seq = [a.draw() for _ in range(200)]
    assert seq == [b.draw() for _ in range(200)] and seq != [c.draw() for _ in range(200)]
    assert first == seq[:1]


def test_gradients_use_exactly_the_version_r_steps_old():
    """w counts the updates applied (each gradient is -1, lr 1): version t holds w = t, so the
    weights a gradient was computed on tell its staleness."""
    cfg = load_config(LINEAR, ["staleness.controlled=true", "staleness.distribution=uniform", "staleness.s=5",
                               "optimizer.learning_rate=1.0"])
    params = {"w": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    stale = ControlledStaleness(cfg, params, ["w"])
    opt = make_optimizer(cfg.optimizer)
    slots = {"w": opt.init_slots(params["w"])}
    seen = []
    for t in range(200):
        read, r = stale.read(params)
        assert read["w"][0] == t - r and r <= min(t, 5)
        assert read["b"] is params["b"]  # untrainable variables are never copied
        seen.append(r)
        stale.apply(opt, params, slots, {"w": np.full(1, -1.0, np.float32)}, read, r, 1.0, t)
        assert params["w"][0] == t + 1
    assert set(seen) == set(range(6))
    assert stale.summary()["max"] == 5 and stale.summary()["count"] == 200


def _train(tmp_path, *overrides):
    cfg = load_config(LINEAR, [f"run_dir={tmp_path}", "train.max_steps=200", *overrides])
    return train(cfg)


def test_staleness_zero_is_bit_identical_to_plain_training(tmp_path):
    plain = _train(tmp_path / "plain")
    controlled = _train(tmp_path / "s0", "staleness.controlled=true", "staleness.s=0")
    assert controlled["staleness"]["max"] == 0 and controlled["staleness"]["count"] == 200
    a, b = load_params(tmp_path / "plain" / "params.npz"), load_params(tmp_path / "s0" / "params.npz")
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert plain["final"] == controlled["final"]


def test_constant_staleness_is_reported_and_still_converges(tmp_path):
    r = _train(tmp_path, "staleness.controlled=true", "staleness.s=4", "train.max_steps=400")
    st = r["staleness"]
    assert st["max"] == 4 and st["p50"] == 4 and st["histogram"] == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 396}
    assert st["requested"]["histogram"] == {"4": 400}
    assert r["final"]["mse"] < 1e-3


def test_large_staleness_slows_convergence(tmp_path):
    """With lr 0.1, s = 0 reaches mse 1e-4 well within 150 steps; s = 16 is still far from it."""
    fresh = _train(tmp_path / "s0", "train.max_steps=150", "staleness.controlled=true", "staleness.s=0")
    stale = _train(tmp_path / "s16", "train.max_steps=150", "staleness.controlled=true", "staleness.s=16")
    assert fresh["target"]["reached"] and fresh["final"]["mse"] < stale["final"]["mse"]


def test_same_seed_same_run(tmp_path):
    a = _train(tmp_path / "a", "staleness.controlled=true", "staleness.distribution=geometric", "staleness.s=8")
    b = _train(tmp_path / "b", "staleness.controlled=true", "staleness.distribution=geometric", "staleness.s=8")
    assert a["staleness"]["histogram"] == b["staleness"]["histogram"] and a["final"] == b["final"]


def test_dcasgd_policy_runs_in_controlled_mode(tmp_path):
    r = _train(tmp_path, "staleness.controlled=true", "staleness.s=4", "optimizer.staleness_policy.name=dcasgd")
    assert np.isfinite(r["final"]["mse"])
    r = _train(tmp_path / "drop", "staleness.controlled=true", "staleness.distribution=uniform", "staleness.s=4",
               "optimizer.staleness_policy={name: drop, max_staleness: 2}")
    assert r["staleness"]["dropped"] > 0


def test_histogram_must_be_given():
    with pytest.raises(ConfigError, match="staleness.histogram must map"):
        load_config(LINEAR, ["staleness.controlled=true", "staleness.distribution=histogram"])
    with pytest.raises(ConfigError, match="staleness.p must be in"):
        load_config(LINEAR, ["staleness.p=0"])


# ----------------------------------------------------------------------------------------------
# On the cluster: the shard's version history (ps/history.py), pulls of "r versions ago"

from asyncps.ps.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from asyncps.ps.history import VersionHistory, history_depth  # noqa: E402
from asyncps.ps.shard import Shard  # noqa: E402
from cli_runner import report, run_ok  # noqa: E402

DISTRIBUTIONS = [
    StalenessConfig(True, "constant", s=3),
    StalenessConfig(True, "uniform", s=5),
    StalenessConfig(True, "geometric", s=7, p=0.3),
    StalenessConfig(True, "histogram", histogram={0: 1, 6: 2, 2: 0}),
]


@pytest.mark.parametrize("cfg", DISTRIBUTIONS)
def test_shard_history_is_as_deep_as_the_largest_draw(cfg):
    assert history_depth(cfg) == StalenessSampler(cfg, 0).s_max
    cfg.controlled = False
    assert history_depth(cfg) == 0


def _shard(*overrides, mode="async"):
    cfg = load_config(LINEAR, ["staleness.controlled=true", "optimizer.learning_rate=1.0", "cluster.workers=1",
                               *overrides])
    cfg.cluster.mode = mode  # (the config refuses sync with controlled staleness; the shard does too)
    shard = Shard(cfg)
    shard.init({"w": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)})
    shard.register_worker(0)
    return cfg, shard


def _drive(shard, ages, worker=0):
    """Pull at each age, then push a gradient of -1 to w (lr 1): version t holds w = t."""
    staleness = []
    for t, r in enumerate(ages):
        version, values = shard.pull(worker, age=r)
        assert version == shard.version - min(r, shard.version) and values["w"][0] == version
        staleness.append(shard.push(worker, t, version, {"w": np.full(1, -1.0, np.float32)}).staleness)
    return staleness


def test_one_worker_pushes_are_exactly_r_stale_and_match_train():
    """The shard serves t - r; with one worker the recorded staleness is r (clamped to t like
    `asyncps train`), draw for draw, and the counters say so."""
    cfg, shard = _shard("staleness.distribution=geometric", "staleness.s=6", "staleness.p=0.3")
    sampler = StalenessSampler(cfg.staleness, cfg.seed)
    ages = [sampler.draw() for _ in range(300)]
    staleness = _drive(shard, ages)
    assert staleness == [min(r, t) for t, r in enumerate(ages)]
    params = {"w": np.zeros(1, np.float32)}
    stale = ControlledStaleness(cfg, params, ["w"])
    opt = make_optimizer(cfg.optimizer)
    slots = {"w": opt.init_slots(params["w"])}
    for t in range(300):
        read, r = stale.read(params)
        stale.apply(opt, params, slots, {"w": np.full(1, -1.0, np.float32)}, read, r, 1.0, t)
    trained = stale.summary()
    stats = shard.stats()
    w0 = stats["workers"][0]
    assert {str(s): n for s, n in enumerate(stats["histogram"]) if n} == trained["histogram"]
    assert {str(s): n for s, n in enumerate(w0["served_age_histogram"]) if n} == trained["served"]["histogram"]
    assert {str(s): n for s, n in enumerate(w0["requested_age_histogram"]) if n} == trained["requested"]["histogram"]
    assert w0["clamped"] == trained["clamped"] == sum(r > t for t, r in enumerate(ages)) > 0
    assert stats["history_depth"] == 6 and stats["history_bytes"] == 6 * 2 * 4  # 6 versions of w and b (float32[1])


def test_several_workers_read_r_ago_and_record_r_plus_the_others_pushes():
    cfg, shard = _shard("staleness.distribution=constant", "staleness.s=3", "cluster.workers=2")
    shard.register_worker(1)
    for t in range(10):
        shard.push(0, t, shard.version, {"w": np.full(1, -1.0, np.float32)})  # 10 versions of history
    v0, _ = shard.pull(0, age=3)
    v1, _ = shard.pull(1, age=3)
    assert v0 == v1 == 7
    assert shard.push(0, 10, v0, {"w": np.full(1, -1.0, np.float32)}).staleness == 3
    assert shard.push(1, 0, v1, {"w": np.full(1, -1.0, np.float32)}).staleness == 4  # r + worker 0's push
    w = {row["worker"]: row for row in shard.stats()["workers"]}
    assert w[1]["served_age_histogram"] == [0, 0, 0, 1] and w[1]["histogram"] == [0, 0, 0, 0, 1]


def test_frozen_variables_are_served_live_and_not_kept():
    cfg, shard = _shard("staleness.s=2", "train.frozen=['b']")
    _drive(shard, [0, 0, 0])
    assert shard.stats()["history_bytes"] == 2 * 4  # two versions of w (float32[1]); b never copied
    version, values = shard.pull(0, age=2)
    assert version == 1 and values["w"][0] == 1 and values["b"][0] == 0


def test_age_beyond_the_history_is_an_error_and_restore_clamps():
    cfg, shard = _shard("staleness.s=2")
    _drive(shard, [0, 0, 0, 0])
    with pytest.raises(InvalidArgument, match=r"pull age 3 is outside the shard's version history \[0, 2\]"):
        shard.pull(0, age=3)
    shard.restore(shard.snapshot())  # a restore keeps no history: the next reads are clamped
    version, _ = shard.pull(0, age=2)
    assert version == 4
    shard.push(0, 4, version, {"w": np.full(1, -1.0, np.float32)})
    assert shard.stats()["workers"][0]["clamped"] == 1
    _, plain = _shard("staleness.controlled=false")
    with pytest.raises(InvalidArgument, match="keeps no version history"):
        plain.pull(0, age=1)
    _, sync = _shard("staleness.s=2", mode="sync")
    with pytest.raises(FailedPrecondition, match="needs cluster.mode async or ssp"):
        sync.pull(0, age=1)


def test_version_history_ring_reuses_its_slots():
    h = VersionHistory(3)
    for v in range(10):
        h.record(v, {"w": np.full(2, v, np.float32)})
    assert h.oldest(10) == 7 and h.nbytes == 3 * 8
    assert [h.values(v)["w"][0] for v in (7, 8, 9)] == [7, 8, 9]
    h.record(9, {"w": np.full(2, 99, np.float32)})  # the update of 9 was dropped: recorded again
    assert h.oldest(9) == 7 and h.values(9)["w"][0] == 99
    assert h.resolve(10, 3) == 7 and h.resolve(10, 1) == 9
    h.clear()
    assert h.resolve(10, 3) == 10


@pytest.mark.parametrize("unary_bytes", [4 << 20, 0], ids=["unary", "streams"])
def test_ages_travel_through_grpc_to_every_shard(unary_bytes):
    """PSClient.pull(age=r) and push_pull(pull_age=r), over real gRPC to 2 shards: both shards
    serve r versions ago (w and b live on different shards), and both record the same ages."""
    from asyncps.partition import place
    from asyncps.ps.server import ShardServer
    from asyncps.ps_client import PSClient

    cfg = load_config(LINEAR, ["staleness.controlled=true", "staleness.distribution=uniform", "staleness.s=4",
                               "optimizer.learning_rate=1.0", "cluster.ps=2", "cluster.workers=1"])
    servers = [ShardServer(cfg, i) for i in range(2)]
    addresses = [f"127.0.0.1:{s.start()}" for s in servers]
    placement = place({"w": ((1,), "float32"), "b": ((1,), "float32")}, 2)
    client = PSClient(addresses, placement, cfg, unary_bytes=unary_bytes)
    minus_one = {"w": np.full(1, -1.0, np.float32), "b": np.full(1, -1.0, np.float32)}
    try:
        client.init({"w": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)})
        client.register(0)
        sampler = StalenessSampler(cfg.staleness, cfg.seed)
        ages = [sampler.draw() for _ in range(41)]
        params, versions = client.pull(worker=0, age=ages[0])
        for t in range(40):
            assert versions == [t - min(ages[t], t)] * 2 and params["w"][0] == params["b"][0] == versions[0]
            results, params, versions = client.push_pull(minus_one, versions, 0, t, pull_age=ages[t + 1])
            assert [r.staleness for r in results] == [min(ages[t], t)] * 2
        stats = client.stats()
        assert stats[0].workers[0].requested_age_histogram == stats[1].workers[0].requested_age_histogram
        assert sum(stats[0].workers[0].served_age_histogram) == 40 and stats[0].history_depth == 4
        with pytest.raises(grpc.RpcError) as err:
            client.pull(worker=0, age=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version history [0, 4]" in err.value.details()
    finally:
        client.close()
        for s in servers:
            s.stop(0)


# ----------------------------------------------------------------------------------------------
# A real cluster (`asyncps launch`) against `asyncps train`, same config, same seed, on the small
# MNIST-shaped folder (tests/conftest.py): what is compared is the staleness drawn and served and
# the runs' identity, which do not depend on the pixels

MNIST_SOFTMAX = CONFIGS / "mnist_softmax.yaml"
GEOMETRIC = ["staleness.controlled=true", "staleness.distribution=geometric", "staleness.s=8", "staleness.p=0.3"]


def _train_histograms(n: int) -> tuple[dict, dict]:
    """(staleness, requested) histograms of `asyncps train`'s first n steps, from its sampler."""
    cfg = load_config(MNIST_SOFTMAX, GEOMETRIC)
    sampler = StalenessSampler(cfg.staleness, cfg.seed)
    draws = [sampler.draw() for _ in range(n)]
    count = lambda values: {str(k): v for k, v in sorted(Counter(values).items())}  # noqa: E731
    return count(min(r, t) for t, r in enumerate(draws)), count(draws)


@pytest.mark.slow
def test_one_worker_cluster_records_exactly_the_staleness_train_records(tmp_path, small_mnist):
    """1 worker, 2 shards: every shard's staleness histogram is train's, draw for draw, and the
    run itself is the same run (same data order, same r per step: the same final metrics).

    The chief pauses the shards a little after max_steps; the last push may then be applied on
    one shard and not the other, so each shard is compared at its own version."""
    run_ok("launch", MNIST_SOFTMAX, f"run_dir={tmp_path / 'launch'}", *GEOMETRIC, f"data.path={small_mnist}",
           "cluster.workers=1", "train.max_steps=300", timeout=240)
    cluster = report(tmp_path / "launch")
    steps = min(cluster["versions"])
    run_ok("train", MNIST_SOFTMAX, f"run_dir={tmp_path / 'train'}", *GEOMETRIC, f"data.path={small_mnist}",
           f"train.max_steps={steps}", timeout=240)
    single = report(tmp_path / "train")
    assert (single["staleness"]["histogram"], single["staleness"]["requested"]["histogram"]) == _train_histograms(steps)
    requested = Counter()
    for shard, version in enumerate(cluster["versions"]):
        recorded, drawn = _train_histograms(version)
        assert cluster["staleness_per_shard"][str(shard)]["histogram"] == recorded
        requested.update(drawn)
    worker = cluster["staleness_per_worker"]["0"]
    assert worker["requested"]["histogram"] == dict(requested)  # merged over the shards
    assert worker["clamped"] == 2 * single["staleness"]["clamped"]
    assert cluster["staleness"]["history"]["depth"] == 8
    assert cluster["staleness"]["distribution_mean"] == single["staleness"]["distribution_mean"]
    if len(set(cluster["versions"])) == 1:  # else the final weights mix two versions
        assert cluster["final"] == single["final"]


@pytest.mark.slow
def test_two_workers_draw_trains_sequence_and_add_their_own_staleness(tmp_path, small_mnist):
    """2 workers: worker 0 draws train's sequence (its requested r match train's over its own
    pushes), every push is served r versions back, and the recorded staleness is r plus the
    other worker's pushes meanwhile, so never below r and larger on average."""
    # 10 ms per step: both workers are up (MNIST loaded) long before the 600th update
    run_ok("launch", MNIST_SOFTMAX, f"run_dir={tmp_path / 'launch'}", *GEOMETRIC, f"data.path={small_mnist}",
           "train.max_steps=600", "delay.kind=constant", "delay.mean_ms=10", timeout=240)
    cluster = report(tmp_path / "launch")
    assert all(cluster["staleness_per_worker"][w]["count"] >= 100 for w in ("0", "1")), cluster["staleness_per_worker"]
    w0 = cluster["staleness_per_worker"]["0"]
    pushes0 = w0["requested"]["count"] // 2
    run_ok("train", MNIST_SOFTMAX, f"run_dir={tmp_path / 'train'}", *GEOMETRIC, f"data.path={small_mnist}",
           f"train.max_steps={pushes0}", timeout=240)
    single = report(tmp_path / "train")
    assert {k: v // 2 for k, v in w0["requested"]["histogram"].items()} == single["staleness"]["requested"]["histogram"]
    st = cluster["staleness"]
    assert st["served"]["count"] == st["requested"]["count"] == st["count"]
    assert st["clamped"] <= 2 * 2 * 8  # only before version 8, per worker and shard
    assert st["mean"] > st["served"]["mean"] and st["served"]["max"] <= 8
    served = {int(k): v for k, v in st["served"]["histogram"].items()}
    assert served[0] > served[1] > served[3] > served[6]  # geometric, p = 0.3


@pytest.mark.parametrize("override", ["cluster.mode=sync", "cluster.prefetch=true"])
def test_controlled_staleness_refuses_sync_and_prefetch(override):
    with pytest.raises(ConfigError, match="staleness.controlled decides what every gradient reads"):
        load_config(LINEAR, ["staleness.controlled=true", override])
    load_config(LINEAR, ["staleness.controlled=false", override])


def test_dcasgd_on_the_cluster_compensates_with_the_values_served():
    """DC-ASGD needs what the worker read: through gRPC (the servicer's export path) the shard
    keeps the old version it served, and the push is compensated against it, as in train."""
    from asyncps.partition import place
    from asyncps.ps.server import ShardServer
    from asyncps.ps_client import PSClient

    cfg = load_config(LINEAR, ["staleness.controlled=true", "staleness.s=2", "optimizer.learning_rate=1.0",
                               "optimizer.staleness_policy.name=dcasgd", "cluster.ps=1", "cluster.workers=1"])
    server = ShardServer(cfg, 0)
    client = PSClient([f"127.0.0.1:{server.start()}"], place({"w": ((1,), "float32")}, 1), cfg)
    try:
        client.init({"w": np.zeros(1, np.float32)})
        client.register(0)
        params, versions = client.pull(worker=0, age=2)
        for t in range(6):
            results, params, versions = client.push_pull({"w": np.full(1, -1.0, np.float32)}, versions, 0, t,
                                                         pull_age=2)
            assert results[0].result == "APPLIED" and results[0].staleness == min(t, 2)
    finally:
        client.close()
        server.stop(0)
