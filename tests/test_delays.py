"""Delay injection: the distributions, their seeding, the straggler, and its effect on staleness."""
import threading
import time

import numpy as np
import pytest

from asyncps.config import DelayConfig, StragglerConfig, load_config
from asyncps.errors import ConfigError
from asyncps.worker.delays import DelayModel
from cli_runner import CONFIGS, report, run_ok

N = 20000


def draws(cfg: DelayConfig, worker: int = 0, seed: int = 0, n: int = N) -> np.ndarray:
    model = DelayModel(cfg, worker, seed)
    return np.array([model.seconds(step) * 1000 for step in range(n)])


@pytest.mark.parametrize("cfg, mean", [
    (DelayConfig(kind="none"), 0.0),
    (DelayConfig(kind="constant", mean_ms=5), 5.0),
    (DelayConfig(kind="uniform", min_ms=2, max_ms=10), 6.0),
    (DelayConfig(kind="exponential", mean_ms=4), 4.0),
    (DelayConfig(kind="lognormal", mean_ms=4, sigma=0.8), 4.0),
])
def test_mean_within_tolerance(cfg, mean):
    d = draws(cfg)
    assert d.min() >= 0
    assert abs(d.mean() - mean) <= 0.03 * max(mean, 1e-9) + 1e-12


def test_shapes_of_the_distributions():
    u = draws(DelayConfig(kind="uniform", min_ms=2, max_ms=10))
    assert 2 <= u.min() and u.max() <= 10 and abs(u.std() - 8 / 12**0.5) < 0.05
    e = draws(DelayConfig(kind="exponential", mean_ms=4))
    assert abs(e.std() - 4) < 0.15  # exponential: std = mean
    ln = draws(DelayConfig(kind="lognormal", mean_ms=4, sigma=0.8))
    assert abs(np.log(ln).std() - 0.8) < 0.02
    assert np.all(draws(DelayConfig(kind="constant", mean_ms=3), n=50) == 3)


def test_seeded_per_worker():
    cfg = DelayConfig(kind="exponential", mean_ms=4)
    assert np.array_equal(draws(cfg, worker=1, seed=7, n=100), draws(cfg, worker=1, seed=7, n=100))
    assert not np.array_equal(draws(cfg, worker=0, seed=7, n=100), draws(cfg, worker=1, seed=7, n=100))
    assert not np.array_equal(draws(cfg, worker=1, seed=7, n=100), draws(cfg, worker=1, seed=8, n=100))


def test_straggler_stretches_only_its_own_steps():
    cfg = DelayConfig(kind="constant", mean_ms=2, straggler=StragglerConfig(worker=1, factor=4))
    assert DelayModel(cfg, 0, 0).seconds(0, compute_seconds=0.010) == pytest.approx(0.002)
    # the straggler's step (10 ms compute + 2 ms delay) takes 4x as long: 48 ms, so it sleeps 38 ms
    assert DelayModel(cfg, 1, 0).seconds(0, compute_seconds=0.010) == pytest.approx(0.038)


def test_straggler_pauses():
    cfg = DelayConfig(straggler=StragglerConfig(worker=0, pause_every=3, pause_ms=50))
    model = DelayModel(cfg, 0, 0)
    assert model.active and not DelayModel(cfg, 1, 0).active
    assert [model.seconds(step) for step in range(6)] == [0, 0, 0.05, 0, 0, 0.05]


def test_wait_is_cut_short_by_stop():
    stop = threading.Event()
    stop.set()
    t0 = time.perf_counter()
    assert DelayModel(DelayConfig(kind="constant", mean_ms=5000), 0, 0).wait(0, 0.0, stop) == 5.0
    assert time.perf_counter() - t0 < 1.0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="delay.straggler.worker must be less than cluster.workers"):
        load_config(CONFIGS / "linear_regression.yaml", ["delay.straggler={worker: 2, factor: 3}"])
    with pytest.raises(ConfigError, match="delay.max_ms must be at least min_ms"):
        load_config(CONFIGS / "linear_regression.yaml", ["delay.kind=uniform", "delay.min_ms=5", "delay.max_ms=1"])
    with pytest.raises(ConfigError, match="delay.kind must be one of"):
        load_config(CONFIGS / "linear_regression.yaml", ["delay.kind=weibull"])


@pytest.mark.slow
def test_straggler_pushes_are_staler_than_the_others(tmp_path):
    """Three workers with a 20 ms delay, worker 0 stretched 10x: while it computes one gradient the
    other two push many times, so its pushes are much staler than theirs. The delay is large next
    to an RPC (a few ms, more when CI's two cores are busy), which the factor does not stretch: with
    a 5 ms delay a loaded machine once brought the counts to 40 against 44."""
    run_ok("launch", CONFIGS / "linear_regression.yaml", f"run_dir={tmp_path}", "cluster.workers=3",
           "train.max_steps=240", "delay.kind=constant", "delay.mean_ms=20",
           "delay.straggler={worker: 0, factor: 10}", timeout=120)
    r = report(tmp_path)
    per_worker = r["staleness_per_worker"]
    slow, fast = per_worker["0"], [per_worker["1"], per_worker["2"]]
    assert slow["count"] >= 5
    for other in fast:
        assert other["count"] > 1.5 * slow["count"]  # the straggler pushes far less often
        assert slow["mean"] > 2.5 * other["mean"] and slow["mean"] >= 3
    assert r["staleness"]["max"] == max(w["max"] for w in per_worker.values())
