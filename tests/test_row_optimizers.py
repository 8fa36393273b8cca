"""FTRL-Proximal and lazy Adam (per-row step counts) against their published formulas, written
out in float64 one coordinate at a time; sparse (row-wise) updates touch only their rows."""
import math

import numpy as np
import pytest

from asyncps.config import OptimizerConfig
from asyncps.ps.optim.optimizers import make_optimizer


def ftrl_reference(w, grads, alpha, l1, l2, beta, n0):
    """McMahan et al. 2013, Algorithm 1, per coordinate, in float64."""
    w = [float(x) for x in w]
    z, n = [0.0] * len(w), [n0] * len(w)
    for g in grads:
        for i, gi in enumerate(g):
            sigma = (math.sqrt(n[i] + gi * gi) - math.sqrt(n[i])) / alpha
            z[i] += gi - sigma * w[i]
            n[i] += gi * gi
            if abs(z[i]) <= l1:
                w[i] = 0.0
            else:
                w[i] = -(z[i] - math.copysign(l1, z[i])) / ((beta + math.sqrt(n[i])) / alpha + l2)
    return np.array(w), np.array(z), np.array(n)


@pytest.mark.parametrize("l1, l2, beta, n0", [(0.0, 0.0, 1.0, 0.1), (0.05, 0.3, 1.0, 0.0), (1.0, 0.0, 0.5, 0.1)])
def test_ftrl_follows_mcmahan_algorithm_1(l1, l2, beta, n0):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    opt = make_optimizer(OptimizerConfig(name="ftrl", ftrl_l1=l1, ftrl_l2=l2, ftrl_beta=beta, initial_accumulator=n0))
    w, slots = w0.copy(), opt.init_slots(w0)
    for step, g in enumerate(grads):
        opt.apply_dense(w, g, slots, 0.2, step)
    ref_w, ref_z, ref_n = ftrl_reference(w0, grads, 0.2, l1, l2, beta, n0)
    np.testing.assert_allclose(w, ref_w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(slots["z"], ref_z, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(slots["n"], ref_n, rtol=2e-6)
    if l1 >= 1.0:
        assert (w == 0).sum() > 0  # L1 makes weights exactly zero


def lazy_adam_reference(w, updates, lr, b1, b2, eps):
    """Adam (Kingma & Ba, Algorithm 1, bias correction in the step) with one t per row."""
    w = w.astype(np.float64).copy()
    m, v, t = np.zeros_like(w), np.zeros_like(w), np.zeros(w.shape[0])
    for rows, g in updates:
        for k, r in enumerate(rows):
            t[r] += 1
            m[r] = b1 * m[r] + (1 - b1) * g[k]
            v[r] = b2 * v[r] + (1 - b2) * g[k] ** 2
            lr_t = lr * math.sqrt(1 - b2 ** t[r]) / (1 - b1 ** t[r])
            w[r] -= lr_t * m[r] / (np.sqrt(v[r]) + eps)
    return w, t


def test_lazy_adam_counts_each_rows_own_steps():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    updates = [(np.array([0, 2]), rng.standard_normal((2, 3)).astype(np.float32)),
               (np.array([2, 4]), rng.standard_normal((2, 3)).astype(np.float32)),
               (np.array([2]), rng.standard_normal((1, 3)).astype(np.float32))]
    opt = make_optimizer(OptimizerConfig(name="lazy_adam", epsilon=1e-7))
    w, slots = w0.copy(), opt.init_slots(w0)
    for step, (rows, g) in enumerate(updates):
        opt.apply_sparse(w, rows, g, slots, 0.01, step)
    ref_w, ref_t = lazy_adam_reference(w0, updates, 0.01, 0.9, 0.999, 1e-7)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    assert slots["t"][:, 0].tolist() == ref_t.tolist() == [1, 0, 3, 0, 1]
    np.testing.assert_array_equal(w[[1, 3]], w0[[1, 3]])  # untouched rows never move


def test_lazy_adam_dense_is_adam():
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    results = []
    for name in ("adam", "lazy_adam"):
        opt = make_optimizer(OptimizerConfig(name=name))
        w, slots = w0.copy(), opt.init_slots(w0)
        for step, g in enumerate(grads):
            opt.apply_dense(w, g, slots, 0.01, step)
        results.append(w)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl", "lazy_adam"])
def test_row_wise_updates_equal_dense_updates_on_the_rows_they_touch(name):
    """A sparse update of rows R equals a dense update restricted to R, and leaves the rest as it was."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((6, 2)).astype(np.float32)
    rows = np.array([1, 4])
    g_rows = rng.standard_normal((2, 2)).astype(np.float32)
    opt = make_optimizer(OptimizerConfig(name=name))
    sparse_w, sparse_slots = w0.copy(), opt.init_slots(w0)
    opt.apply_sparse(sparse_w, rows, g_rows, sparse_slots, 0.1, 0)
    block_w = w0[rows].copy()
    block_slots = {k: v[rows].copy() for k, v in opt.init_slots(w0).items()}
    opt.apply_dense(block_w, g_rows, block_slots, 0.1, 0)
    np.testing.assert_array_equal(sparse_w[rows], block_w)
    untouched = np.setdiff1d(np.arange(6), rows)
    np.testing.assert_array_equal(sparse_w[untouched], w0[untouched])
