"""Graph mode: trace a loss function once, then replay its forward and backward op lists.

The first call with a given input signature (shapes and dtypes of every array, which
parameters are differentiated, any static arguments) runs eagerly on a tracing tape. The
recorded op list becomes a `_Plan`: a forward list of (forward, argument slots, attrs) and the
backward steps of the eager engine, with a preallocated buffer for every intermediate value
and every intermediate gradient. Replays do the same numpy calls in the same order as eager
mode, so gradients are bit-identical; they skip Tensor and node bookkeeping, the toposort and
most allocations. A new signature (such as a last partial batch) is traced anew.

Returned gradients are always fresh arrays owned by the caller; buffers never leak out.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

from asyncps.worker.autodiff.core import (
    GradientTape, Tensor, accepts_out, accumulate, backward, value_of,
)

_FIRST, _ADD_INTO, _FIRST_COPY, _ACCUMULATE = range(4)  # how a VJP result joins its parent's gradient


class _RngSlot:
    """Stands in for a numpy Generator input: replays draw from the current call's generator."""

    def __init__(self, generator: np.random.Generator):
        self.generator = generator

    def __getattr__(self, name):
        return getattr(self.generator, name)


class GraphFunction:
    """``loss_fn(params, *inputs) -> scalar Tensor`` compiled to (loss, gradients w.r.t. `wrt`).

    `params` is a name-keyed dict of arrays; parameters not in `wrt` are treated as constants.
    `inputs` may be arrays (traced), numpy Generators (replays draw from the one passed to each
    call) or other hashable values (static: part of the signature). Calls return
    ``(loss: float, grads: dict[str, ndarray | SparseRows])``.
    """

    def __init__(self, loss_fn, wrt=None, max_traces: int = 8):
        self.loss_fn = loss_fn
        self.wrt = None if wrt is None else tuple(wrt)
        self.max_traces = max_traces
        self.traces = 0  # how many times a signature was traced (for tests and logs)
        self._plans: OrderedDict = OrderedDict()

    def __call__(self, params: dict, *inputs):
        wrt = tuple(params) if self.wrt is None else self.wrt
        key = _signature(params, inputs, wrt)
        plan = self._plans.get(key)
        if plan is not None:
            return plan.run(params, inputs)
        plan, result = _trace(self.loss_fn, params, inputs, wrt)
        self.traces += 1
        self._plans[key] = plan
        if len(self._plans) > self.max_traces:
            self._plans.popitem(last=False)
        return result


def trace_gradient(loss_fn, wrt=None) -> GraphFunction:
    """Graph-mode gradients of ``loss_fn(params, *inputs)`` w.r.t. the parameters named in `wrt`."""
    return GraphFunction(loss_fn, wrt)


def _signature(params: dict, inputs: tuple, wrt: tuple) -> tuple:
    return (wrt, tuple((k, v.shape, v.dtype) for k, v in params.items()), tuple(map(_input_signature, inputs)))


def _input_signature(x):
    if isinstance(x, np.ndarray):
        return (x.shape, x.dtype)
    if isinstance(x, np.random.Generator):
        return "rng"
    return ("static", x)


def _trace_input(tape: GradientTape, x, rngs: list):
    if isinstance(x, np.ndarray):
        return tape.trace_input(x)
    if isinstance(x, np.random.Generator):
        rngs.append(_RngSlot(x))
        return rngs[-1]
    return x


def _trace(loss_fn, params: dict, inputs: tuple, wrt: tuple):
    """Run `loss_fn` eagerly on a tracing tape; return the compiled plan and the eager result."""
    unknown = sorted(set(wrt) - set(params))
    if unknown:
        raise KeyError(f"wrt names parameters that are not in params: {unknown}")
    tape, rngs = GradientTape(trace=True), []
    with tape:
        p = {k: tape.watch(v) if k in wrt else tape.trace_input(v) for k, v in params.items()}
        ins = [_trace_input(tape, x, rngs) for x in inputs]
        loss = loss_fn(p, *ins)
    if type(loss) is not Tensor or loss.node is None or not loss.node.needs_grad:
        raise ValueError("graph mode: the loss does not depend on any differentiated parameter")
    leaves = [t.node for t in list(p.values()) + ins if type(t) is Tensor]
    plan = _Plan(tape.records, leaves, loss, [p[k].node for k in wrt], wrt, rngs)
    grads = plan.eager_backward()
    return plan, (float(loss.value), plan.collect(grads, params))


class _Plan:
    """One traced signature: value slots, forward steps, backward steps and their buffers."""

    def __init__(self, records, leaves, loss: Tensor, wrt_nodes, wrt: tuple, rngs: list):
        self.slot = {node: i for i, node in enumerate(leaves)}
        self.n_leaves = len(leaves)
        self.vals: list = [None] * len(leaves)
        self.res: list = [None] * len(leaves)
        self.forward = [self._forward_step(node, args, attrs, value) for node, args, attrs, value in records]
        self.res.extend([None] * (len(self.vals) - len(self.res)))
        self.loss_node, self.loss_slot = loss.node, self.slot[loss.node]
        self.seed = np.ones_like(loss.value)
        self.wrt, self.wrt_slots = wrt, [self.slot[n] for n in wrt_nodes]
        self.rngs = rngs
        self.backward: list = []

    def _constant(self, value) -> int:
        self.vals.append(value)
        return len(self.vals) - 1

    def _forward_step(self, node, args, attrs, value):
        srcs = tuple(
            self.slot[a.node] if type(a) is Tensor and a.node in self.slot else self._constant(value_of(a))
            for a in args
        )
        kw = dict(attrs)
        if accepts_out(node.op.forward) and isinstance(value, np.ndarray) and value.ndim:
            kw["out"] = np.empty_like(value)
        self.slot[node] = self._constant(None)
        return self.slot[node], functools.partial(node.op.forward, **kw), srcs

    def eager_backward(self) -> dict:
        """The eager backward pass on the traced nodes, compiling the replay's steps as it goes."""
        seen: set = set()

        def observe(node, i, parent, cotangent, contribution, accumulated):
            self.backward.append(self._backward_step(node, i, parent, cotangent, contribution, accumulated, seen))

        return backward(self.loss_node, self.seed, observe)

    def _backward_step(self, node, i, parent, cotangent, contribution, accumulated, seen):
        fn, leaf = node.op.vjp(i), parent.op is None
        kw, buf = {}, None
        if not leaf and accepts_out(fn) and _is_dense(contribution) and contribution.ndim:
            kw["out"] = np.empty_like(contribution)
        if parent not in seen:
            aliased = leaf and _is_dense(contribution) and np.may_share_memory(contribution, cotangent)
            mode = _FIRST_COPY if aliased else _FIRST
        elif leaf or not _is_dense(accumulated):
            mode = _ACCUMULATE
        else:
            mode, buf = _ADD_INTO, np.empty_like(accumulated)
        seen.add(parent)
        return functools.partial(fn, **kw), self.slot[node], self.slot[parent], mode, buf

    def collect(self, grads, params: dict) -> dict:
        """Gradients by parameter name; zeros for parameters the loss does not depend on."""
        if isinstance(grads, dict):  # from eager_backward: keyed by node
            grads = {self.slot[n]: g for n, g in grads.items()}
            get = grads.get
        else:
            get = lambda s: grads[s]  # noqa: E731
        out = {}
        for name, s in zip(self.wrt, self.wrt_slots):
            g = get(s)
            out[name] = np.zeros_like(params[name]) if g is None else g
        return out

    def run(self, params: dict, inputs: tuple):
        """Replay forward and backward on new values of the traced signature."""
        vals, res = self.vals, self.res
        vals[: self.n_leaves] = list(params.values()) + [x for x in inputs if isinstance(x, np.ndarray)]
        for slot, rng in zip(self.rngs, (x for x in inputs if isinstance(x, np.random.Generator))):
            slot.generator = rng
        for k, fwd, srcs in self.forward:
            vals[k], res[k] = fwd(*[vals[s] for s in srcs])
        grads = [None] * len(vals)
        grads[self.loss_slot] = self.seed
        for fn, k, pk, mode, buf in self.backward:
            c = fn(grads[k], res[k])
            if mode == _FIRST:
                grads[pk] = c
            elif mode == _ADD_INTO:
                grads[pk] = np.add(grads[pk], c, out=buf)
            elif mode == _FIRST_COPY:
                grads[pk] = c.copy()
            else:
                grads[pk] = accumulate(grads[pk], c)
        return float(vals[self.loss_slot]), self.collect(grads, params)


def _is_dense(g) -> bool:
    return isinstance(g, np.ndarray)
