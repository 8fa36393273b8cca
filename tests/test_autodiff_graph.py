"""Graph mode: bit-identical to eager, retraced on new shapes, buffers never leak to callers."""
import numpy as np
import pytest

from asyncps.config import ModelConfig
from asyncps.worker.autodiff import GradientTape, Op, ops
from asyncps.worker.autodiff.graph import GraphFunction, trace_gradient
from asyncps.worker.models import build_model
from asyncps.worker.step import GradientComputer

MNIST = {"input_shape": (784,), "num_classes": 10}


def _batch(rng, n):
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("cfg", [ModelConfig(name="mlp", hidden=[32, 16]), ModelConfig(name="cnn", dropout=0.5)],
                         ids=["mlp", "cnn"])
def test_graph_gradients_are_bit_identical_to_eager(cfg, rng):
    model = build_model(cfg, MNIST)
    params = model.init_params(rng)
    eager, graph = (GradientComputer(model, list(params), graph_mode=m) for m in (False, True))
    for step in range(3):  # the first call traces, the next ones replay
        x, y = _batch(rng, 8)
        loss_e, grads_e = eager(params, x, y, np.random.default_rng(step))
        loss_g, grads_g = graph(params, x, y, np.random.default_rng(step))
        assert loss_e == loss_g
        for name in params:
            assert grads_g[name].dtype == np.float32
            np.testing.assert_array_equal(grads_g[name], grads_e[name], err_msg=name)
        params = {k: v - 0.01 * grads_e[k] for k, v in params.items()}


def test_graph_retraces_on_a_new_batch_shape_and_reuses_old_traces(rng):
    model = build_model(ModelConfig(name="softmax"), MNIST)
    params = model.init_params(rng)
    compute = GradientComputer(model, list(params), graph_mode=True)
    for n in (16, 16, 5, 16, 5):
        x, y = _batch(rng, n)
        loss, grads = compute(params, x, y, rng)
        with GradientTape() as tape:
            p = tape.watch(params)
            expected = tape.gradient(model.loss(p, x, y), p)
        np.testing.assert_array_equal(grads["softmax.kernel"], expected["softmax.kernel"])
    assert compute._graph.traces == 2


def _shared_and_aliased(p, x):
    # w feeds three ops (accumulation); c's gradient is relu's VJP buffer itself (add passes it on)
    h = ops.tanh(x @ p["w"]) + ops.exp(x @ p["w"])
    c = ops.relu(x @ p["w"] + p["c"])
    return (h * h).sum() + (c * c).sum() + (p["b"] + 1.0).sum() + ops.gather(p["e"], np.array([0, 0])).sum()


def test_replayed_gradients_are_owned_by_the_caller(rng):
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2), "c": rng.standard_normal((5, 2)),
              "e": rng.standard_normal((4, 2))}
    fn = trace_gradient(_shared_and_aliased)
    _, first = fn(params, rng.standard_normal((5, 3)))
    kept = {k: v.copy() if isinstance(v, np.ndarray) else v.to_dense() for k, v in first.items()}
    x = rng.standard_normal((5, 3))
    _, second = fn(params, x)
    for k in ("w", "b", "c"):
        np.testing.assert_array_equal(first[k], kept[k])
    with GradientTape() as tape:
        p = tape.watch(params)
        eager = tape.gradient(_shared_and_aliased(p, x), p)
    for k in params:
        np.testing.assert_array_equal(np.asarray(getattr(second[k], "values", second[k])),
                                      np.asarray(getattr(eager[k], "values", eager[k])))


def test_frozen_parameters_get_no_gradient(rng):
    model = build_model(ModelConfig(name="mlp", hidden=[8]), MNIST)
    params = model.init_params(rng)
    for graph_mode in (False, True):
        compute = GradientComputer(model, ["dense2.kernel", "dense2.bias"], graph_mode=graph_mode)
        _, grads = compute(params, *_batch(rng, 4), rng)
        assert set(grads) == {"dense2.kernel", "dense2.bias"}


# elementwise and marked in-place; unlike relu it changes every value it overwrites
_negate = Op("negate", lambda x, out=None: (np.negative(x, out=out), None), lambda g, r: -g, inplace_forward=True)


def _in_place_op_after_exp(p, x):
    return (_negate(ops.exp(x @ p["w"])) * x[:, :2]).sum()  # exp's VJP reads its output: not in place


def _relu_of_a_value_used_twice(p, x):
    h = x @ p["w"]
    return (ops.relu(h) * h).sum()


def _relu_of_a_view(p, x):
    h = x @ p["w"]
    flat = ops.reshape(h, (-1,))  # a view of h, which exp reads after relu ran
    return ops.relu(flat).sum() + ops.exp(h).sum()


def _relu_sharing_its_cotangent(p, x):
    # add hands one cotangent to both sides; relu's VJP runs first and must not overwrite it
    return (x @ p["w"] + ops.relu(x @ p["w"])).sum()


def _relu_chain(p, x):
    h = ops.relu(ops.relu(x @ p["w"] + p["b"]))  # in place twice, forward and backward
    return ops.softmax_cross_entropy(h, np.array([0, 1, 0, 1, 0]))


@pytest.mark.parametrize("fn", [_in_place_op_after_exp, _relu_of_a_value_used_twice, _relu_of_a_view,
                                _relu_sharing_its_cotangent, _relu_chain])
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reused"])
def test_in_place_replay_is_bit_identical_to_eager(fn, reuse, rng):
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    assert_replays_match_eager(GraphFunction(fn, reuse_outputs=reuse), fn, params, lambda: rng.standard_normal((5, 3)))


def assert_replays_match_eager(graph, fn, params, new_input, calls: int = 3) -> None:
    """The trace, then replays on new inputs, each bit-identical to an eager tape of `fn`."""
    for _ in range(calls):
        x = new_input()
        loss, grads = graph(params, x)
        with GradientTape() as tape:
            p = tape.watch(params)
            out = fn(p, x)
        expected = tape.gradient(out, p)
        assert loss == float(out.value)
        for k in params:
            np.testing.assert_array_equal(grads[k], expected[k], err_msg=k)


def _two_leaves_share_a_cotangent(p, x):
    return ((p["a"] + p["b"]) * x).sum()  # add's VJP passes the same cotangent to a and b


def test_reused_outputs_are_distinct_buffers_rewritten_by_each_call(rng):
    params = {"a": rng.standard_normal(4), "b": rng.standard_normal(4)}
    graph = GraphFunction(_two_leaves_share_a_cotangent, reuse_outputs=True)
    graph(params, rng.standard_normal(4))  # the trace returns the eager arrays
    _, first = graph(params, rng.standard_normal(4))
    assert not np.may_share_memory(first["a"], first["b"])
    first["a"] *= 0.5  # a caller may scale its gradients in place, as SGD does
    x = rng.standard_normal(4)
    _, second = graph(params, x)
    assert second["a"] is first["a"]  # the same buffer, rewritten
    np.testing.assert_array_equal(second["a"], x)
    np.testing.assert_array_equal(second["b"], x)


@pytest.mark.parametrize("stride,padding,ksize,pool_stride", [
    (1, "SAME", 2, 2), (2, "VALID", 3, 2), (2, "SAME", 3, 1), (1, "VALID", 2, 3),
])
def test_conv_and_pool_replays_reuse_their_workspaces_bit_identically(stride, padding, ksize, pool_stride, rng):
    # replays keep im2col, padding and col2im arrays from one call to the next (ws): padded
    # borders filled once, overlapping pool windows (ksize > stride) and uncovered pixels
    # (stride > ksize) must still give eager's bits
    def loss(p, x):
        h = ops.conv2d(p["x"] + x, p["w"], p["b"], stride=stride, padding=padding)  # col2im runs too
        h = ops.max_pool2d(ops.tanh(h), ksize=ksize, stride=pool_stride, padding=padding)
        return (h * h).sum()

    params = {"w": rng.standard_normal((3, 3, 2, 4)), "b": rng.standard_normal(4),
              "x": rng.standard_normal((2, 9, 8, 2))}
    assert_replays_match_eager(GraphFunction(loss, reuse_outputs=True), loss, params,
                               lambda: rng.standard_normal((2, 9, 8, 2)))


def test_charlm_graph_gradients_match_eager_sparse_rows_included(rng):
    cfg = ModelConfig(name="charlm", context=4, embed_dim=3, hidden=[8])
    model = build_model(cfg, {"input_shape": (4,), "num_classes": 11, "vocab_size": 11})
    params = model.init_params(rng)
    eager, graph = (GradientComputer(model, list(params), graph_mode=m) for m in (False, True))
    for step in range(3):
        x, y = rng.integers(0, 11, (6, 4)), rng.integers(0, 11, 6)
        loss_e, grads_e = eager(params, x, y, rng)
        loss_g, grads_g = graph(params, x, y, rng)
        assert loss_e == loss_g
        table_e, table_g = grads_e.pop("embed.table"), grads_g.pop("embed.table")
        np.testing.assert_array_equal(table_g.rows, table_e.rows)  # the embedding's gradient stays sparse
        np.testing.assert_array_equal(table_g.values, table_e.values)
        for name in grads_e:
            np.testing.assert_array_equal(grads_g[name], grads_e[name], err_msg=name)
