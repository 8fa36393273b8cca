"""Server-side optimizers against hand-computed updates (TensorFlow's formulas).

Every expected value below is written out as arithmetic on the literal inputs, independently of
the code under test. Inputs: w0 = [1, -2], then gradients G1, G2, G3, one per step.
"""
import math

import numpy as np
import pytest

from asyncps.config import OptimizerConfig, load_config
from asyncps.errors import ConfigError
from asyncps.ps.optim import OPTIMIZERS, make_optimizer

W0 = [1.0, -2.0]
G1, G2, G3 = [0.5, 1.0], [-1.0, 0.25], [2.0, -0.5]
EPS = 1e-7


def run_steps(cfg: OptimizerConfig, grads, lr: float, w0=W0):
    """Apply `grads` densely from `w0`; returns the weights after each step and the slots."""
    opt = make_optimizer(cfg)
    w = np.array(w0, dtype=np.float32)
    slots = opt.init_slots(w)
    history = []
    for step, g in enumerate(grads):
        opt.apply_dense(w, np.array(g, dtype=np.float32), slots, lr, step)
        history.append(w.copy())
    return history, slots


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, np.array(expected, dtype=np.float64), rtol=2e-6, atol=1e-7)


def test_sgd_hand_computed():
    (w1, w2), _ = run_steps(OptimizerConfig(name="sgd"), [G1, G2], lr=0.1)
    assert_close(w1, [1.0 - 0.1 * 0.5, -2.0 - 0.1 * 1.0])  # [0.95, -2.1]
    assert_close(w2, [0.95 + 0.1 * 1.0, -2.1 - 0.1 * 0.25])  # [1.05, -2.125]


def test_momentum_hand_computed():
    (w1, w2, w3), slots = run_steps(OptimizerConfig(name="momentum", momentum=0.9), [G1, G2, G3], lr=0.1)
    # v1 = G1 = [0.5, 1.0]; w1 = w0 - 0.1 * v1
    assert_close(w1, [0.95, -2.1])
    # v2 = 0.9 * v1 + G2 = [0.45 - 1.0, 0.9 + 0.25] = [-0.55, 1.15]
    assert_close(w2, [0.95 + 0.055, -2.1 - 0.115])
    # v3 = 0.9 * v2 + G3 = [-0.495 + 2.0, 1.035 - 0.5] = [1.505, 0.535]
    assert_close(w3, [1.005 - 0.1505, -2.215 - 0.0535])
    assert_close(slots["momentum"], [1.505, 0.535])


def test_nesterov_hand_computed():
    (w1, w2), slots = run_steps(OptimizerConfig(name="nesterov", momentum=0.9), [G1, G2], lr=0.1)
    # v1 = [0.5, 1.0]; step = 0.1 * (G1 + 0.9 * v1) = 0.1 * [0.95, 1.9]
    assert_close(w1, [1.0 - 0.095, -2.0 - 0.19])
    # v2 = [-0.55, 1.15]; G2 + 0.9 * v2 = [-1.0 - 0.495, 0.25 + 1.035] = [-1.495, 1.285]
    assert_close(w2, [0.905 + 0.1495, -2.19 - 0.1285])
    assert_close(slots["momentum"], [-0.55, 1.15])


def test_adam_hand_computed():
    cfg = OptimizerConfig(name="adam", beta1=0.9, beta2=0.999, epsilon=EPS)
    (w1, w2), slots = run_steps(cfg, [G1, G2], lr=0.1)
    # t = 1: m = 0.1 * G1 = [0.05, 0.1]; v = 0.001 * G1^2 = [0.00025, 0.001]
    lr_1 = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected_1 = [1.0 - lr_1 * 0.05 / (math.sqrt(0.00025) + EPS), -2.0 - lr_1 * 0.1 / (math.sqrt(0.001) + EPS)]
    assert_close(w1, expected_1)
    assert_close(w1, [0.9, -2.1])  # the first Adam step is lr * sign(g), up to epsilon
    # t = 2: m = 0.9 * [0.05, 0.1] + 0.1 * [-1.0, 0.25] = [-0.055, 0.115]
    #        v = 0.999 * [0.00025, 0.001] + 0.001 * [1.0, 0.0625] = [0.00124975, 0.0010615]
    lr_2 = 0.1 * math.sqrt(1 - 0.999 ** 2) / (1 - 0.9 ** 2)
    expected_2 = [expected_1[0] - lr_2 * -0.055 / (math.sqrt(0.00124975) + EPS),
                  expected_1[1] - lr_2 * 0.115 / (math.sqrt(0.0010615) + EPS)]
    assert_close(w2, expected_2)
    assert_close(slots["m"], [-0.055, 0.115])
    assert_close(slots["v"], [0.00124975, 0.0010615])


def test_rmsprop_without_momentum_hand_computed():
    cfg = OptimizerConfig(name="rmsprop", rho=0.9, epsilon=EPS)
    (w1, w2), slots = run_steps(cfg, [G1, G2], lr=0.01)
    assert set(slots) == {"ms"}
    # ms1 = 0.1 * G1^2 = [0.025, 0.1]
    expected_1 = [1.0 - 0.01 * 0.5 / math.sqrt(0.025 + EPS), -2.0 - 0.01 * 1.0 / math.sqrt(0.1 + EPS)]
    assert_close(w1, expected_1)
    # ms2 = 0.9 * [0.025, 0.1] + 0.1 * [1.0, 0.0625] = [0.1225, 0.09625]
    expected_2 = [expected_1[0] + 0.01 * 1.0 / math.sqrt(0.1225 + EPS),
                  expected_1[1] - 0.01 * 0.25 / math.sqrt(0.09625 + EPS)]
    assert_close(w2, expected_2)
    assert_close(slots["ms"], [0.1225, 0.09625])


def test_rmsprop_with_momentum_hand_computed():
    cfg = OptimizerConfig(name="rmsprop", rho=0.9, epsilon=EPS, rmsprop_momentum=0.5)
    (w1, w2), slots = run_steps(cfg, [G1, G2], lr=0.01)
    mom_1 = [0.01 * 0.5 / math.sqrt(0.025 + EPS), 0.01 * 1.0 / math.sqrt(0.1 + EPS)]
    assert_close(w1, [1.0 - mom_1[0], -2.0 - mom_1[1]])
    mom_2 = [0.5 * mom_1[0] + 0.01 * -1.0 / math.sqrt(0.1225 + EPS),
             0.5 * mom_1[1] + 0.01 * 0.25 / math.sqrt(0.09625 + EPS)]
    assert_close(w2, [1.0 - mom_1[0] - mom_2[0], -2.0 - mom_1[1] - mom_2[1]])
    assert_close(slots["mom"], mom_2)


def test_rmsprop_ignores_the_momentum_of_momentum_optimizers():
    plain, _ = run_steps(OptimizerConfig(name="rmsprop"), [G1, G2], lr=0.01)
    with_momentum_key, _ = run_steps(OptimizerConfig(name="rmsprop", momentum=0.99), [G1, G2], lr=0.01)
    np.testing.assert_array_equal(plain[-1], with_momentum_key[-1])


def test_adagrad_hand_computed():
    cfg = OptimizerConfig(name="adagrad", initial_accumulator=0.1, epsilon=EPS)
    (w1, w2), slots = run_steps(cfg, [G1, G2], lr=0.1)
    # acc1 = 0.1 + G1^2 = [0.35, 1.1]
    expected_1 = [1.0 - 0.1 * 0.5 / (math.sqrt(0.35) + EPS), -2.0 - 0.1 * 1.0 / (math.sqrt(1.1) + EPS)]
    assert_close(w1, expected_1)
    # acc2 = acc1 + G2^2 = [1.35, 1.1625]
    expected_2 = [expected_1[0] + 0.1 * 1.0 / (math.sqrt(1.35) + EPS),
                  expected_1[1] - 0.1 * 0.25 / (math.sqrt(1.1625) + EPS)]
    assert_close(w2, expected_2)
    assert_close(slots["accumulator"], [1.35, 1.1625])


def test_init_slots_names_dtype_and_initial_values():
    value = np.ones((3, 2), dtype=np.float32)
    expected = {"sgd": {}, "momentum": {"momentum": 0.0}, "nesterov": {"momentum": 0.0},
                "adam": {"m": 0.0, "v": 0.0}, "rmsprop": {"ms": 0.0}, "adagrad": {"accumulator": 0.25}}
    for name, initial in expected.items():
        opt = make_optimizer(OptimizerConfig(name=name, initial_accumulator=0.25))
        slots = opt.init_slots(value)
        assert opt.slot_names == tuple(initial) and set(slots) == set(initial)
        for slot_name, fill in initial.items():
            assert slots[slot_name].dtype == np.float32 and slots[slot_name].shape == (3, 2)
            assert np.all(slots[slot_name] == fill)


def test_weight_decay_adds_l2_gradient_before_the_update():
    # g' = g + 0.01 * w = [0.5 + 0.01, 1.0 - 0.02] = [0.51, 0.98]
    (w1,), _ = run_steps(OptimizerConfig(name="sgd", weight_decay=0.01), [G1], lr=0.1)
    assert_close(w1, [1.0 - 0.051, -2.0 - 0.098])
    (w1,), slots = run_steps(OptimizerConfig(name="momentum", weight_decay=0.01), [G1], lr=0.1)
    assert_close(slots["momentum"], [0.51, 0.98])  # the decayed gradient is what accumulates
    assert_close(w1, [0.949, -2.098])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_caller_gradient_is_never_written(name):
    opt = make_optimizer(OptimizerConfig(name=name, weight_decay=0.1))
    w = np.ones((4, 3), dtype=np.float32)
    grad = np.frombuffer(np.full((4, 3), 0.5, dtype=np.float32).tobytes(), dtype=np.float32).reshape(4, 3)
    assert not grad.flags.writeable  # as decoded from the wire
    slots = opt.init_slots(w)
    opt.apply_dense(w, grad, slots, 0.1, 0)
    opt.apply_sparse(w, np.array([1, 3]), grad[:2], slots, 0.1, 1)
    assert np.all(grad == 0.5) and w.dtype == np.float32


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_matches_dense_on_touched_rows_and_leaves_others(name, weight_decay, rng):
    cfg = OptimizerConfig(name=name, weight_decay=weight_decay, rmsprop_momentum=0.5)
    opt = make_optimizer(cfg)
    value = rng.standard_normal((6, 3)).astype(np.float32)
    slots = opt.init_slots(value)
    reference, ref_slots = value.copy(), {k: v.copy() for k, v in slots.items()}
    for step, rows in enumerate([[4, 1], [1, 5, 0], [2]]):
        rows = np.array(rows, dtype=np.int64)
        grad_rows = rng.standard_normal((len(rows), 3)).astype(np.float32)
        before = value.copy()
        opt.apply_sparse(value, rows, grad_rows, slots, 0.05, step)
        for i, r in enumerate(rows):  # dense update of each touched row, through row views
            opt.apply_dense(reference[r], grad_rows[i], {k: v[r] for k, v in ref_slots.items()}, 0.05, step)
        untouched = np.setdiff1d(np.arange(6), rows)
        np.testing.assert_array_equal(value[untouched], before[untouched])
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7)
        for k in slots:
            np.testing.assert_allclose(slots[k], ref_slots[k], rtol=1e-6, atol=1e-7)


def test_sparse_momentum_is_lazy_hand_computed():
    opt = make_optimizer(OptimizerConfig(name="momentum", momentum=0.9))
    w = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    slots = opt.init_slots(w)
    opt.apply_sparse(w, np.array([0, 2]), np.array([[1.0], [1.0]], dtype=np.float32), slots, 0.1, 0)
    opt.apply_sparse(w, np.array([2]), np.array([[-1.0]], dtype=np.float32), slots, 0.1, 1)
    # row 0: v = 1 after step 0, untouched at step 1 (no decay, no move): w = 1 - 0.1
    # row 2: v = 1, then 0.9 * 1 - 1 = -0.1: w = 3 - 0.1 + 0.01
    assert_close(w[:, 0], [0.9, 2.0, 2.91])
    assert_close(slots["momentum"][:, 0], [1.0, 0.0, -0.1])


def test_unknown_optimizer_name_is_rejected_by_the_config_loader(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: adamw, learning_rate: 0.01}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.name") as info:
        load_config(path)
    assert "adamw" in str(info.value)


def test_make_optimizer_names_the_key_for_an_unknown_name():
    with pytest.raises(ValueError, match=r"optimizer\.name"):
        make_optimizer(OptimizerConfig(name="lamb"))


def test_rmsprop_momentum_out_of_range_is_rejected(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: rmsprop, rmsprop_momentum: 1.5}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.rmsprop_momentum"):
        load_config(path)
