"""The tape's semantics: accumulation, pruning, sparse gradients, errors, and the checker itself."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from asyncps.worker.autodiff import GradientTape, Op, SparseRows, ops, unbroadcast
from asyncps.worker.autodiff.gradcheck import GradCheckError, check_grads


def grad_of(fn, *arrays):
    with GradientTape() as tape:
        ts = [tape.watch(a) for a in arrays]
        y = fn(*ts)
    return tape.gradient(y, ts)


def test_tensor_used_twice_accumulates():
    x = np.array([1.0, 2.0, 3.0])
    (g,) = grad_of(lambda t: (t * t + t).sum(), x)
    np.testing.assert_allclose(g, 2 * x + 1)


def test_gradients_into_given_arrays_equal_the_usual_ones():
    """tape.gradient(out=...): the worker computes gradients into its shared-memory segment.
    The arrays given are the ones returned, with the same values, also for a variable used twice
    (its contributions add up after the first was written there) and one the loss ignores."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32),
              "v": rng.standard_normal((3, 3)).astype(np.float32), "unused": np.ones(2, np.float32)}
    x = rng.standard_normal((4, 5)).astype(np.float32)

    def grads(out=None):
        with GradientTape() as tape:
            t = {k: tape.watch(v) for k, v in params.items()}
            h = ops.linear(x, t["w"], t["b"])
            y = ops.matmul(h, t["v"]) + ops.matmul(h, t["v"])  # v used twice: accumulated
            loss = (y * y).sum()
        return tape.gradient(loss, t, out=out)

    usual = grads()
    out = {k: np.full_like(v, np.nan) for k, v in params.items()}
    given = grads(out)
    for k in params:
        assert given[k] is out[k]
        np.testing.assert_array_equal(given[k], usual[k])


def test_diamond_graph_is_ordered_before_reversal():
    x = np.array([0.5, -1.5])
    (g,) = grad_of(lambda t: ((a := ops.exp(t)) * ops.tanh(a)).sum(), x)
    a = np.exp(x)
    np.testing.assert_allclose(g, a * np.tanh(a) + a * a * (1 - np.tanh(a) ** 2))


def test_dict_in_dict_out_and_float32_kept():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    with GradientTape() as tape:
        p = tape.watch(params)
        loss = ops.l2_loss(ops.linear(np.ones((4, 3), np.float32), p["w"], p["b"]))
    grads = tape.gradient(loss, p)
    assert set(grads) == {"w", "b"} and all(g.dtype == np.float32 for g in grads.values())


def test_vjps_of_constants_are_never_computed():
    def fail(g, res):
        raise AssertionError("VJP of a constant was computed")

    probe = Op("probe", lambda a, b: (a * b, b), lambda g, b: g * b, fail)
    (g,) = grad_of(lambda t: probe(t, np.full(3, 2.0)).sum(), np.ones(3))
    np.testing.assert_array_equal(g, [2.0, 2.0, 2.0])


def test_missing_vjp_names_op_and_argument():
    with GradientTape() as tape:
        table, ids = tape.watch(np.ones((4, 2))), tape.watch(np.array([1, 2]))
        y = ops.gather(table, ids).sum()
    with pytest.raises(NotImplementedError, match=r"'gather'.*argument 1 \(indices\)"):
        tape.gradient(y, ids)


def test_unconnected_sources_get_zeros_and_ops_after_exit_are_not_recorded():
    with GradientTape() as tape:
        a, b = tape.watch(np.ones(2)), tape.watch(np.ones(3))
        y = a.sum()
    later = a * 3.0
    assert later.node is None
    np.testing.assert_array_equal(tape.gradient(y, [a, b])[1], np.zeros(3))


def test_gather_gradient_is_sparse_rows_with_duplicates_summed():
    table = np.arange(10.0).reshape(5, 2)
    ids = np.array([[3, 1], [3, 3]])
    (g,) = grad_of(lambda t: (ops.gather(t, ids) * 2.0).sum(), table)
    assert isinstance(g, SparseRows) and g.dense_shape == (5, 2)
    np.testing.assert_array_equal(g.rows, [1, 3])
    np.testing.assert_array_equal(g.values, [[2, 2], [6, 6]])
    np.testing.assert_array_equal(g.to_dense(), [[0, 0], [2, 2], [0, 0], [6, 6], [0, 0]])


def test_sparse_and_dense_contributions_add_up():
    table = np.ones((4, 2))
    (g,) = grad_of(lambda t: ops.gather(t, np.array([0, 0])).sum() + t.sum() + ops.gather(t, np.array([2])).sum(), table)
    np.testing.assert_array_equal(g, [[3, 3], [1, 1], [2, 2], [1, 1]])


def test_unbroadcast_sums_added_and_stretched_axes():
    g = np.ones((2, 3, 4))
    assert unbroadcast(g, (3, 1)).tolist() == [[8.0]] * 3
    assert unbroadcast(g, ()).item() == 24.0
    assert unbroadcast(g, (2, 3, 4)) is g


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (g,) = grad_of(lambda z: ops.softmax_cross_entropy(z, np.array([1])), logits)
    assert np.isfinite(g).all()
    assert float(ops.softmax_cross_entropy(logits, np.array([1])).value) == pytest.approx(1e4)


@settings(max_examples=30, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div"]), seed=st.integers(0, 2**16))
def test_binary_ops_broadcast_gradients(shapes, op, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes.input_shapes)
    b = np.abs(b) + 0.5 if op == "div" else b
    check_grads(getattr(ops, op), a, b, rng=rng, name=op)


def test_checker_fails_on_a_wrong_vjp(rng):
    bad_square = Op("bad_square", lambda x: (x * x, x), lambda g, x: g * x)  # d(x^2)/dx is 2x
    with pytest.raises(GradCheckError, match="bad_square"):
        check_grads(bad_square, rng.standard_normal((3, 4)), rng=rng, name="bad_square")


def test_checker_passes_the_right_vjp(rng):
    square = Op("square", lambda x: (x * x, x), lambda g, x: 2 * g * x)
    check_grads(square, rng.standard_normal((3, 4)), rng=rng)
