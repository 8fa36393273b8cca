"""Controlled staleness: seeded draws of r, and gradients computed on weights exactly r versions old."""
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
