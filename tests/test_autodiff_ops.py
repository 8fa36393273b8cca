"""One gradient check per op: VJPs against float64 central differences along random directions."""
import numpy as np
import pytest

from asyncps.worker.autodiff import ops
from asyncps.worker.autodiff.gradcheck import check_grads

LABELS = np.array([0, 2, 1, 2, 0])
IDS = np.array([[1, 3], [3, 0], [1, 1]])  # repeated rows: their gradients must be summed


def _dropout(x):
    return ops.dropout(x, rate=0.3, rng=np.random.default_rng(7))  # same mask on every call


# name: (function of Tensors, input shapes, inputs must be positive)
CASES = {
    "add": (lambda a, b: a + b, [(3, 4), (4,)], False),
    "sub": (lambda a, b: a - b, [(3, 1), (1, 4)], False),
    "mul": (lambda a, b: a * b, [(2, 3, 4), (3, 1)], False),
    "div": (lambda a, b: a / b, [(3, 4), (3, 4)], True),
    "pow": (lambda a, b: a ** b, [(3, 4), (4,)], True),
    "pow_const": (lambda a: a ** 3, [(5,)], False),
    "neg": (lambda a: -a, [(3, 4)], False),
    "exp": (ops.exp, [(3, 4)], False),
    "log": (ops.log, [(3, 4)], True),
    "tanh": (ops.tanh, [(3, 4)], False),
    "sigmoid": (ops.sigmoid, [(3, 4)], False),
    "relu": (ops.relu, [(3, 4)], False),
    "matmul": (lambda a, b: a @ b, [(3, 4), (4, 5)], False),
    "matmul_batched": (lambda a, b: a @ b, [(2, 3, 4), (4, 5)], False),
    "linear": (ops.linear, [(3, 4), (4, 5), (5,)], False),
    "sum_all": (lambda a: a.sum(), [(3, 4)], False),
    "sum_axis": (lambda a: a.sum(axis=1), [(2, 3, 4)], False),
    "sum_keepdims": (lambda a: a.sum(axis=(0, 2), keepdims=True), [(2, 3, 4)], False),
    "mean_axis": (lambda a: a.mean(axis=0), [(3, 4)], False),
    "max_axis": (lambda a: a.max(axis=1), [(3, 4)], False),
    "max_keepdims": (lambda a: a.max(axis=0, keepdims=True), [(3, 4)], False),
    "reshape": (lambda a: a.reshape(6, 2), [(3, 4)], False),
    "transpose": (lambda a: ops.transpose(a, axes=(2, 0, 1)), [(2, 3, 4)], False),
    "concat": (lambda a, b, c: ops.concat(a, b, c, axis=1), [(2, 3), (2, 1), (2, 2)], False),
    "getitem_slice": (lambda a: a[1:, ::2], [(3, 4)], False),
    "getitem_fancy": (lambda a: a[np.array([0, 2, 0])], [(3, 4)], False),
    "gather": (lambda t: ops.gather(t, IDS), [(4, 3)], False),
    "conv2d_same": (lambda x, w: ops.conv2d(x, w), [(2, 5, 5, 2), (3, 3, 2, 3)], False),
    "conv2d_valid_stride2": (
        lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding="VALID"), [(2, 7, 6, 2), (3, 2, 2, 3), (3,)], False),
    "conv2d_same_stride2": (
        lambda x, w: ops.conv2d(x, w, stride=2, padding="SAME"), [(1, 6, 5, 1), (5, 5, 1, 2)], False),
    "max_pool2d_valid": (ops.max_pool2d, [(2, 4, 6, 3)], False),
    "max_pool2d_same_odd": (lambda x: ops.max_pool2d(x, padding="SAME"), [(1, 5, 3, 2)], False),
    "max_pool2d_3x3_stride2": (lambda x: ops.max_pool2d(x, ksize=3, stride=2), [(1, 7, 7, 2)], False),
    "dropout": (_dropout, [(4, 5)], False),
    "softmax_cross_entropy": (lambda z: ops.softmax_cross_entropy(z, LABELS), [(5, 3)], False),
    "l2_loss": (ops.l2_loss, [(3, 4)], False),
    "softmax": (ops.softmax, [(3, 4)], False),
    "log_softmax": (lambda a: ops.log_softmax(a, axis=0), [(3, 4)], False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vjp_matches_finite_differences(name, rng):
    fn, shapes, positive = CASES[name]
    args = [rng.standard_normal(s) for s in shapes]
    check_grads(fn, *[np.abs(a) + 0.5 if positive else a for a in args], rng=rng, name=name)


def op_checked_by(case: str) -> str | None:
    """The registered op a case checks: the longest op name that is the case's name or its
    prefix before an underscore ("log_softmax" checks log_softmax, not log)."""
    matches = [op for op in ops.REGISTRY if case == op or case.startswith(op + "_")]
    return max(matches, key=len, default=None)


def test_every_registered_op_has_a_check():
    covered = {op_checked_by(case) for case in CASES}
    assert sorted(set(ops.REGISTRY) - covered) == []


def test_the_coverage_check_sees_a_missing_case():
    """Removing the `log` case must be noticed (a prefix match once hid it behind log_softmax)."""
    without_log = {op_checked_by(case) for case in CASES if case != "log"}
    assert "log" not in without_log and "log_softmax" in without_log
