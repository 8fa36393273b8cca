"""Graph mode: trace a loss function once, then replay its forward and backward op lists.

The first call with a given input signature (shapes and dtypes of every array, which
parameters are differentiated, any static arguments) runs eagerly on a tracing tape. The
recorded op list becomes a `_Plan`: a forward list of (forward, argument slots, attrs) and the
backward steps of the eager engine, with a preallocated buffer for every intermediate value
and every intermediate gradient, and a workspace per step for ops that keep scratch arrays
(conv2d's im2col matrix). An op marked in-place (relu) writes over its input, or over its
cotangent in the backward pass, when the trace shows that nothing else reads that array: no
other op, no residual, no view. Replays do the same numpy computations in the same order as
eager mode, so gradients are bit-identical; they skip Tensor and node bookkeeping, the toposort
and the allocations. A new signature (such as a last partial batch) is traced anew.

By default returned gradients are fresh arrays owned by the caller and buffers never leak out.
With ``reuse_outputs=True`` each dense gradient is returned in a buffer of its own that the next
call overwrites: nothing is allocated per call for it (arrays of 128 KiB and more come from
mmap, and on the development VM their page faults cost more than the matmuls of an MLP step).
Such a caller must use the gradients (apply, encode or copy them) before it calls again.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

from asyncps.worker.autodiff.core import (
    GradientTape, Node, Tensor, accepts, accepts_out, accumulate, backward, value_of,
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
    ``(loss: float, grads: dict[str, ndarray | SparseRows])``: fresh arrays, or with
    `reuse_outputs` this function's buffers, valid until the next call (the caller may write
    into them; each replay rewrites them in full).
    """

    def __init__(self, loss_fn, wrt=None, max_traces: int = 8, reuse_outputs: bool = False):
        self.loss_fn = loss_fn
        self.wrt = None if wrt is None else tuple(wrt)
        self.reuse_outputs = reuse_outputs
        self.max_traces = max_traces
        self.traces = 0  # how many times a signature was traced (for tests and logs)
        self._plans: OrderedDict = OrderedDict()

    def __call__(self, params: dict, *inputs):
        wrt = tuple(params) if self.wrt is None else self.wrt
        key = _signature(params, inputs, wrt)
        plan = self._plans.get(key)
        if plan is not None:
            return plan.run(params, inputs)
        plan, result = _trace(self.loss_fn, params, inputs, wrt, self.reuse_outputs)
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


def _trace(loss_fn, params: dict, inputs: tuple, wrt: tuple, reuse_outputs: bool = False):
    """Run `loss_fn` eagerly on a tracing tape; return the compiled plan and the eager result."""
    unknown = sorted(set(wrt) - set(params))
    if unknown:
        raise KeyError(f"wrt names parameters that are not in params: {unknown}")
    tape = GradientTape(trace=True)
    rngs: list[_RngSlot] = []
    with tape:
        p = {k: tape.watch(v) if k in wrt else tape.trace_input(v) for k, v in params.items()}
        ins = [_trace_input(tape, x, rngs) for x in inputs]
        loss = loss_fn(p, *ins)
    if type(loss) is not Tensor or loss.node is None or not loss.node.needs_grad:
        raise ValueError("graph mode: the loss does not depend on any differentiated parameter")
    leaves = [t.node for t in list(p.values()) + ins if type(t) is Tensor]
    plan = _Plan(tape.records, leaves, loss, [p[k].node for k in wrt], wrt, rngs, reuse_outputs)
    grads = plan.eager_backward()
    return plan, (float(loss.value), plan.collect(grads, params))


class _Plan:
    """One traced signature: value slots, forward steps, backward steps and their buffers.

    With `reuse_outputs` every differentiated parameter with a dense gradient owns one buffer
    that each replay rewrites and returns (no per-call allocation); otherwise the returned
    gradients are fresh arrays.
    """

    def __init__(self, records, leaves, loss: Tensor, wrt_nodes, wrt: tuple, rngs: list, reuse_outputs: bool):
        self.slot = {node: i for i, node in enumerate(leaves)}
        self.n_leaves = len(leaves)
        self.vals: list = [None] * len(leaves)
        self.res: list = [None] * len(leaves)
        reusable = _dead_after_one_use(records, loss.node)
        self.forward = [self._forward_step(node, args, attrs, value, reusable) for node, args, attrs, value in records]
        self.res.extend([None] * (len(self.vals) - len(self.res)))
        assert loss.node is not None  # _trace refuses a loss that depends on no parameter
        self.loss_node, self.loss_slot = loss.node, self.slot[loss.node]
        self.seed = np.ones_like(loss.value)
        self.wrt, self.wrt_slots = wrt, [self.slot[n] for n in wrt_nodes]
        self.rngs = rngs
        self.reuse_outputs = reuse_outputs
        self.backward: list = []
        self.owned: dict[int, np.ndarray] = {}  # leaf slot -> the buffer its gradient is returned in
        self.exclusive: set[int] = set()  # slots whose gradient is an array no one else holds

    def _constant(self, value) -> int:
        self.vals.append(value)
        return len(self.vals) - 1

    def _forward_step(self, node, args, attrs, value, reusable: set):
        srcs = tuple(
            self.slot[a.node] if type(a) is Tensor and a.node in self.slot else self._constant(value_of(a))
            for a in args
        )
        kw, fn = dict(attrs), node.op.forward
        if accepts(fn, "ws"):
            kw["ws"] = {}  # this step's own scratch arrays, kept from one replay to the next
        first = args[0] if args else None
        if (node.op.inplace_forward and type(first) is Tensor and first.node in reusable
                and _same_layout(first.value, value)):
            # the input is dead after this op and no residual holds it: write over it (relu
            # over the output of a linear layer needs no buffer of its own)
            fn = functools.partial(_over_first_input, functools.partial(fn, **kw))
        elif accepts_out(fn) and isinstance(value, np.ndarray) and value.ndim:
            fn = functools.partial(fn, out=np.empty_like(value), **kw)
        else:
            fn = functools.partial(fn, **kw)
        self.slot[node] = self._constant(None)
        return self.slot[node], fn, srcs

    def eager_backward(self) -> dict:
        """The eager backward pass on the traced nodes, then the replay's steps compiled from it.

        The steps are compiled after the pass because a parameter's buffer takes the shape and
        dtype of its final, accumulated gradient.
        """
        seen: dict[Node, object] = {}  # parent -> its gradient so far
        steps: list[tuple] = []

        def observe(node, i, parent, cotangent, contribution, accumulated):
            first, before = parent not in seen, seen.get(parent)
            seen[parent] = accumulated
            aliased = _is_dense(contribution) and np.may_share_memory(contribution, cotangent)
            dense_sum = not first and _is_dense(before) and _is_dense(contribution) and _is_dense(accumulated)
            steps.append((node, i, parent, cotangent, contribution, accumulated, first, aliased, dense_sum))

        grads = backward(self.loss_node, self.seed, observe)
        if self.reuse_outputs:
            by_slot = {self.slot[n]: g for n, g in grads.items()}
            for s in self.wrt_slots:
                if _is_dense(by_slot.get(s)):  # sparse gradients (SparseRows) stay fresh arrays
                    self.owned[s] = np.empty_like(by_slot[s])
        self.backward = [self._backward_step(*step) for step in steps]
        return grads

    def _backward_step(self, node, i, parent, cotangent, contribution, accumulated, first, aliased, dense_sum):
        fn, k, pk = node.op.vjp(i), self.slot[node], self.slot[parent]
        leaf, can_out = parent.op is None, accepts_out(fn) and _is_dense(contribution) and contribution.ndim
        kw: dict[str, object] = {"ws": {}} if accepts(fn, "ws") else {}
        buf = None
        own = self.owned.get(pk) if leaf else None
        if own is not None:
            # every write goes straight into the parameter's own buffer: the first contribution
            # through the VJP's `out` (`collect` copies it in if the VJP could not take `out`),
            # later ones added into it in place (elementwise, so the same bits as a + b)
            fits = _is_dense(contribution) and contribution.shape == own.shape and contribution.dtype == own.dtype
            if first:
                if can_out and fits:
                    kw["out"] = own
                return functools.partial(fn, **kw), k, pk, _FIRST, None
            if dense_sum:
                return functools.partial(fn, **kw), k, pk, _ADD_INTO, own
            return functools.partial(fn, **kw), k, pk, _ACCUMULATE, None
        in_place = (not leaf and node.op.inplace_vjp and k in self.exclusive and _one_vjp(node)
                    and _is_dense(contribution) and _same_layout(cotangent, contribution))
        if in_place:
            # the cotangent is this step's alone and read by no other VJP: overwrite it
            fn = functools.partial(_over_cotangent, fn)
        elif not leaf and can_out:
            kw["out"] = np.empty_like(contribution)
        if first:
            mode = _FIRST_COPY if leaf and aliased else _FIRST
        elif leaf or not dense_sum:
            mode = _ACCUMULATE
        else:
            # a separate buffer: the gradient so far may alias a cotangent that is read again
            mode, buf = _ADD_INTO, np.empty_like(accumulated)
        # whether the parent's gradient will be an array that nothing else refers to
        if not leaf and ((first and ("out" in kw or in_place)) or (mode == _ADD_INTO)):
            self.exclusive.add(pk)
        else:
            self.exclusive.discard(pk)
        return functools.partial(fn, **kw), k, pk, mode, buf

    def collect(self, grads, params: dict) -> dict:
        """Gradients by parameter name; zeros for parameters the loss does not depend on."""
        if isinstance(grads, dict):  # from eager_backward: keyed by node, fresh arrays
            grads = {self.slot[n]: g for n, g in grads.items()}
            out = {}
            for name, s in zip(self.wrt, self.wrt_slots):
                g = grads.get(s)
                out[name] = np.zeros_like(params[name]) if g is None else g
            return out
        out = {}
        for name, s in zip(self.wrt, self.wrt_slots):
            g, own = grads[s], self.owned.get(s)
            if own is not None and g is not None:
                if g is not own:
                    np.copyto(own, g)  # a VJP that ignored `out`, or an alias of a cotangent
                g = own
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


def _same_layout(a, b) -> bool:
    return _is_dense(a) and _is_dense(b) and a.shape == b.shape and a.dtype == b.dtype


def _one_vjp(node) -> bool:
    """Whether exactly one VJP of `node` runs (reads its cotangent)."""
    return sum(1 for p in node.parents if p is not None and p.needs_grad) == 1


def _over_first_input(fn, x, *args):
    return fn(x, *args, out=x)


def _over_cotangent(fn, g, res, **kw):
    return fn(g, res, out=g, **kw)


def _arrays(x):
    """The numpy arrays in a value or residual (nested tuples, lists and dicts)."""
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _arrays(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _arrays(item)


def _dead_after_one_use(records, loss_node) -> set:
    """Traced nodes whose value one op reads and nothing else holds: no other op, residual,
    input or view shares its memory. An in-place op may overwrite such a value."""
    uses: dict = {}
    for _, args, _, _ in records:
        for a in args:
            if type(a) is Tensor:
                uses[a.node] = uses.get(a.node, 0) + 1
    values, residuals = [], []  # the arrays ops read, and the arrays backward will read
    for node, args, _, value in records:
        values.extend(_arrays(value))
        values.extend(_arrays([value_of(a) for a in args]))
        residuals.extend(_arrays(node.res))
    out = set()
    for node, _, _, value in records:
        if node is loss_node or uses.get(node) != 1 or not _is_dense(value) or value.ndim == 0:
            continue
        if any(np.may_share_memory(r, value) for r in residuals):
            continue  # a VJP reads it (exp keeps its own output, for one)
        if not any(v is not value and np.may_share_memory(v, value) for v in values):
            out.add(node)  # and no other value is a view of it, nor it of one
    return out
