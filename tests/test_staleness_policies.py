"""Staleness policies against hand-computed values of their published formulas."""
import math

import numpy as np
import pytest

from asyncps.config import StalenessPolicyConfig, load_config
from asyncps.errors import ConfigError
from asyncps.ps.optim import (
    DROPPED,
    AdaptiveDelayCompensation,
    DelayCompensation,
    Drop,
    LrScale,
    NoPolicy,
    make_staleness_policy,
)


def f32(x):
    return np.array(x, dtype=np.float32)


def policy(**kw):
    return make_staleness_policy(StalenessPolicyConfig(**kw))


def test_make_staleness_policy_by_name():
    expected = {"none": NoPolicy, "drop": Drop, "lr_scale": LrScale, "dcasgd": DelayCompensation,
                "dcasgd_adaptive": AdaptiveDelayCompensation}
    for name, cls in expected.items():
        p = policy(name=name)
        assert type(p) is cls
        assert p.needs_value_read == name.startswith("dcasgd")


def test_none_applies_every_gradient_unchanged():
    g = f32([1.0, 2.0])
    grad, scale = policy(name="none").adjust(g, 50)
    assert grad is g and scale == 1.0


def test_drop_only_above_max_staleness():
    p, g = policy(name="drop", max_staleness=2), f32([1.0])
    for s in (0, 1, 2):
        assert p.adjust(g, s) == (g, 1.0)
    assert p.adjust(g, 3) is DROPPED
    grad, scale = p.adjust(g, 100)
    assert grad is None and scale == 0.0


def test_lr_scale_divides_by_staleness_with_full_rate_when_fresh():
    p, g = policy(name="lr_scale"), f32([1.0])
    assert [p.adjust(g, s).lr_scale for s in (0, 1, 2, 4, 10)] == [1.0, 1.0, 0.5, 0.25, 0.1]
    assert p.adjust(g, 4).grad is g


def test_negative_staleness_is_a_bug():
    with pytest.raises(ValueError, match="staleness"):
        policy(name="none").adjust(f32([1.0]), -1)


def test_dcasgd_hand_computed():
    p = policy(name="dcasgd", dc_lambda=0.5)
    g = f32([1.0, -2.0, 0.5])
    now, read = f32([1.0, 1.0, 1.0]), f32([0.5, 2.0, 1.0])
    grad, scale = p.adjust(g, 3, now, read)
    # w_now - w_read = [0.5, -1.0, 0]; g*g = [1, 4, 0.25]
    # g + 0.5 * g*g * diff = [1 + 0.5*0.5, -2 + 0.5*4*(-1), 0.5 + 0] = [1.25, -4.0, 0.5]
    np.testing.assert_allclose(grad, [1.25, -4.0, 0.5], rtol=1e-7)
    assert scale == 1.0 and grad.dtype == np.float32
    np.testing.assert_array_equal(g, [1.0, -2.0, 0.5])  # the caller's gradient is untouched


def test_dcasgd_at_staleness_zero_returns_the_gradient():
    g = f32([1.0, -2.0])
    assert policy(name="dcasgd").adjust(g, 0, f32([1.0, 1.0]), None).grad is g


def test_dcasgd_sparse_rows_hand_computed():
    p = policy(name="dcasgd", dc_lambda=0.5)
    now = f32([[1.0, 1.0], [9.0, 9.0], [1.0, 1.0]])
    read = f32([[0.5, 1.0], [0.0, 0.0], [2.0, 1.0]])
    rows, g = np.array([2, 0]), f32([[-2.0, 3.0], [1.0, 3.0]])
    grad, _ = p.adjust(g, 2, now, read, rows=rows)
    # row 2: diff [-1, 0] -> [-2 + 0.5*4*(-1), 3]; row 0: diff [0.5, 0] -> [1 + 0.5*1*0.5, 3]
    np.testing.assert_allclose(grad, [[-4.0, 3.0], [1.25, 3.0]], rtol=1e-7)


def test_dcasgd_adaptive_hand_computed():
    eps = 1e-7
    p = policy(name="dcasgd_adaptive", dc_lambda=0.5, dc_momentum=0.5, dc_epsilon=eps)
    now = f32([1.0, 1.0])
    state = p.init_state(now)
    assert set(state) == {"dc_meansquare"} and np.all(state["dc_meansquare"] == 0)
    # push 1: ms = 0.5*0 + 0.5*[1, 4] = [0.5, 2.0]; lambda_t = 0.5 / sqrt(ms + eps)
    grad, _ = p.adjust(f32([1.0, -2.0]), 1, now, f32([0.5, 2.0]), state)
    expected = [1.0 + 0.5 / math.sqrt(0.5 + eps) * 1.0 * 0.5, -2.0 + 0.5 / math.sqrt(2.0 + eps) * 4.0 * -1.0]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)  # about [1.35355, -3.41421]
    np.testing.assert_allclose(state["dc_meansquare"], [0.5, 2.0], rtol=1e-7)
    # push 2: ms = 0.5*[0.5, 2] + 0.5*[4, 0] = [2.25, 1.0]; lambda_t ~ [1/3, 1/2]; diff [0.1, 0.2]
    grad, _ = p.adjust(f32([2.0, 0.0]), 2, f32([1.1, 1.2]), now, state)
    np.testing.assert_allclose(grad, [2.0 + (1 / 3) * 4.0 * 0.1, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state["dc_meansquare"], [2.25, 1.0], rtol=1e-7)


def test_dcasgd_adaptive_tracks_mean_square_even_when_fresh():
    p = policy(name="dcasgd_adaptive", dc_momentum=0.5)
    state = p.init_state(f32([0.0, 0.0]))
    g = f32([2.0, 1.0])
    assert p.adjust(g, 0, f32([0.0, 0.0]), None, state).grad is g
    np.testing.assert_allclose(state["dc_meansquare"], [2.0, 0.5])  # 0.5 * g^2


def test_dcasgd_adaptive_sparse_updates_only_touched_rows_of_its_state():
    p = policy(name="dcasgd_adaptive", dc_lambda=0.5, dc_momentum=0.5)
    now, read = f32([[1.0], [1.0], [1.0]]), f32([[0.5], [0.0], [3.0]])
    state = p.init_state(now)
    state["dc_meansquare"][:] = 7.0
    grad, _ = p.adjust(f32([[1.0]]), 1, now, read, state, rows=np.array([0]))
    # ms row 0 = 0.5*7 + 0.5*1 = 4; lambda_t = 0.5/2; g = 1 + 0.25*1*0.5
    np.testing.assert_allclose(grad, [[1.125]], rtol=1e-6)
    np.testing.assert_allclose(state["dc_meansquare"][:, 0], [4.0, 7.0, 7.0], rtol=1e-7)


def test_staleness_policy_loads_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: sgd, staleness_policy: {name: dcasgd, dc_lambda: 0.1}}\n")
    cfg = load_config(path).optimizer.staleness_policy
    assert (cfg.name, cfg.dc_lambda, cfg.dc_momentum, cfg.dc_epsilon) == ("dcasgd", 0.1, 0.95, 1e-7)


@pytest.mark.parametrize("section, key", [("{name: stale}", "name"), ("{dc_momentum: 1.0}", "dc_momentum"),
                                          ("{max_staleness: -1}", "max_staleness")])
def test_bad_staleness_policy_is_rejected_naming_the_key(tmp_path, section, key):
    path = tmp_path / "run.yaml"
    path.write_text(f"optimizer: {{staleness_policy: {section}}}\n")
    with pytest.raises(ConfigError, match=rf"optimizer\.staleness_policy\.{key}"):
        load_config(path)


@pytest.mark.parametrize("policy", ["dcasgd", "dcasgd_adaptive"])
def test_delay_compensation_with_prefetch_is_refused(tmp_path, policy):
    """With cluster.prefetch a gradient is one pull older than the weights the shard keeps for
    the worker: compensating against them would be wrong, so the config says so up front."""
    path = tmp_path / "run.yaml"
    path.write_text(f"optimizer: {{staleness_policy: {{name: {policy}}}}}\ncluster: {{prefetch: true}}\n")
    with pytest.raises(ConfigError, match=rf"staleness_policy {policy} needs cluster.prefetch false"):
        load_config(path)
