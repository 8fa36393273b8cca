"""The engine: primitives, tensors, the tape, and the backward pass.

A primitive (`Op`) pairs a forward with one vector-Jacobian product (VJP) per differentiable
argument, in the style of JAX's custom_vjp:

    forward :: (*arrays, **attrs)  -> (value, residuals)
    vjp_i   :: (g, residuals)      -> gradient for argument i

The forward saves only the residuals its VJPs need. Forwards and VJPs that accept an ``out``
keyword write into that preallocated buffer and return it (graph mode uses this); eager mode
never passes it. An op marked `inplace_forward` (`inplace_vjp`) is elementwise in its first
argument (in its cotangent), so ``out`` may be that very array: graph mode does so when nothing
else reads it.

Backward is "toposort, reverse, accumulate". Graph mode (`graph.py`) compiles its replay
from an eager `backward` run, so both add gradient contributions in the same order and give
bit-identical results.
"""
from __future__ import annotations

import inspect
import itertools
import operator

import numpy as np

from asyncps.sparse import SparseRows  # noqa: F401  (re-exported: the tape returns it)


class Op:
    """A primitive: ``forward(*args, **attrs) -> (value, residuals)`` and per-argument VJPs.

    Calling an Op on Tensors or arrays runs the forward and, when a recording tape owns one of
    the inputs, records a node for the backward pass. `vjps` holds one function per argument
    position (``None`` for arguments with no gradient, such as integer labels).
    """

    def __init__(self, name: str, forward, *vjps, inplace_forward: bool = False, inplace_vjp: bool = False):
        self.name = name
        self.forward = forward
        self.inplace_forward, self.inplace_vjp = inplace_forward, inplace_vjp
        self.vjps = vjps[0] if len(vjps) == 1 and isinstance(vjps[0], PerArg) else vjps
        params = inspect.signature(forward).parameters
        self.argnames = [p for p, v in params.items() if v.kind != v.KEYWORD_ONLY and p != "out"]

    def __call__(self, *args, **attrs) -> "Tensor":
        return apply(self, args, attrs)

    def vjp(self, i: int):
        """The VJP for argument `i`; raises naming the op and the argument if there is none."""
        try:
            fn = self.vjps[i]
        except IndexError:
            fn = None
        if fn is None:
            arg = self.argnames[i] if i < len(self.argnames) else f"#{i}"
            raise NotImplementedError(f"op '{self.name}' has no VJP for argument {i} ({arg})")
        return fn

    def __repr__(self):
        return f"Op({self.name})"


_TAKES_OUT: dict = {}  # code object -> accepts_out (PerArg makes a new lambda per call, same code)


def _takes_out(fn) -> bool:
    """accepts_out, remembered per code object (a callable without one, a partial say, is asked
    each time: keying on it could grow without bound)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return accepts_out(fn)
    known = _TAKES_OUT.get(code)
    if known is None:
        known = _TAKES_OUT[code] = accepts_out(fn)
    return known


def accepts_out(fn) -> bool:
    """Whether a forward or VJP can write its result into a preallocated ``out`` buffer."""
    return accepts(fn, "out")


def accepts(fn, keyword: str) -> bool:
    """Whether `fn` takes the keyword argument `keyword` (``out``, ``ws``)."""
    return keyword in inspect.signature(fn).parameters


class PerArg:
    """VJPs of a variadic op (such as concat): ``PerArg(f)[i]`` is ``g, res -> f(g, res, i)``."""

    def __init__(self, fn):
        self.fn = fn

    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        return lambda g, res: self.fn(g, res, i)


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `g` over the axes that broadcasting added or stretched, so it has `shape`."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes).reshape(shape)


def accumulate(a, b):
    """a + b for gradients that may be dense arrays or SparseRows; never writes into either."""
    if isinstance(a, SparseRows) and isinstance(b, SparseRows):
        return SparseRows.from_duplicates(
            np.concatenate([a.rows, b.rows]), np.concatenate([a.values, b.values]), a.dense_shape
        )
    if isinstance(a, SparseRows):
        a, b = b, a
    if isinstance(b, SparseRows):
        out = a.copy()
        np.add.at(out, b.rows, b.values)
        return out
    return a + b


_SEQUENCE = itertools.count()
_creation_order = operator.attrgetter("seq")


class Node:
    """One recorded value: the op that made it, its parent nodes and the op's residuals.

    Leaves (watched variables and traced inputs) have ``op is None``. `needs_grad` is true when
    the value depends on a watched variable; only such parents get VJPs computed.
    """

    __slots__ = ("op", "parents", "res", "needs_grad", "seq")

    def __init__(self, op, parents, res, needs_grad):
        self.seq = next(_SEQUENCE)
        self.op = op
        self.parents = parents
        self.res = res
        self.needs_grad = needs_grad


class Tensor:
    """A numpy value plus, when recorded on a tape, the node that produced it.

    Arithmetic operators, ``@`` and indexing dispatch to the ops registry, so model code reads
    like numpy. Plain arrays and Python numbers mix freely as constants.
    """

    __slots__ = ("value", "node", "tape")
    __array_priority__ = 100  # so ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, value, node: Node | None = None, tape: "GradientTape | None" = None):
        self.value = value
        self.node = node
        self.tape = tape

    shape = property(lambda self: self.value.shape)
    dtype = property(lambda self: self.value.dtype)
    ndim = property(lambda self: self.value.ndim)
    T = property(lambda self: _ops().transpose(self))

    def __repr__(self):
        kind = "watched" if self.node is not None and self.node.needs_grad else "constant"
        return f"Tensor({kind}, shape={self.shape}, dtype={self.dtype})"

    def numpy(self) -> np.ndarray:
        """The value as a numpy array."""
        return self.value

    def reshape(self, *shape):
        return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)

    def sum(self, axis=None, keepdims=False):
        return _ops().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops().mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        return _ops().max(self, axis=axis, keepdims=keepdims)

    __add__ = lambda a, b: _ops().add(a, b)
    __radd__ = lambda a, b: _ops().add(b, a)
    __sub__ = lambda a, b: _ops().sub(a, b)
    __rsub__ = lambda a, b: _ops().sub(b, a)
    __mul__ = lambda a, b: _ops().mul(a, b)
    __rmul__ = lambda a, b: _ops().mul(b, a)
    __truediv__ = lambda a, b: _ops().div(a, b)
    __rtruediv__ = lambda a, b: _ops().div(b, a)
    __pow__ = lambda a, b: _ops().pow(a, b)
    __rpow__ = lambda a, b: _ops().pow(b, a)
    __matmul__ = lambda a, b: _ops().matmul(a, b)
    __rmatmul__ = lambda a, b: _ops().matmul(b, a)
    __neg__ = lambda a: _ops().neg(a)
    __getitem__ = lambda a, idx: _ops().getitem(a, idx=idx)


def _ops():
    from asyncps.worker.autodiff import ops  # the registry imports this module

    return ops


def value_of(x):
    """The numpy value of a Tensor, or `x` itself."""
    return x.value if type(x) is Tensor else x


def apply(op: Op, args: tuple, attrs: dict) -> Tensor:
    """Run `op` on `args`; record a node when a recording tape owns one of the Tensors."""
    tape, values = None, []
    for a in args:
        if type(a) is Tensor:
            if tape is None and a.tape is not None and a.tape.recording:
                tape = a.tape
            values.append(a.value)
        else:
            values.append(a)
    value, res = op.forward(*values, **attrs)
    if tape is None:
        return Tensor(value)
    return tape.record(op, args, attrs, value, res)


class GradientTape:
    """Records ops on watched variables and computes gradients by reverse accumulation.

    ::

        with GradientTape() as tape:
            p = tape.watch(params)          # dict[str, ndarray] -> dict[str, Tensor]
            loss = model_loss(p, batch)
        grads = tape.gradient(loss, p)      # dict[str, ndarray | SparseRows]

    Only ops run inside the ``with`` block are recorded. With ``trace=True`` the tape also
    records ops on non-differentiable inputs (see `trace_input`) together with their arguments,
    which is what graph mode replays.
    """

    def __init__(self, trace: bool = False):
        self.recording = False
        self.trace = trace
        self.records: list[tuple[Node, tuple, dict, object]] = []  # trace: (node, args, attrs, value)

    def __enter__(self) -> "GradientTape":
        self.recording = True
        return self

    def __exit__(self, *exc) -> None:
        self.recording = False

    def watch(self, x):
        """Mark a variable (array, Tensor, or dict of them) as differentiable; returns Tensors."""
        if isinstance(x, dict):
            return {name: self.watch(v) for name, v in x.items()}
        value = x if type(x) is np.ndarray else np.asarray(value_of(x))
        return Tensor(value, Node(None, (), None, True), self)

    def trace_input(self, x) -> Tensor:
        """A traced but non-differentiable input (data, labels, frozen variables)."""
        return Tensor(np.asarray(value_of(x)), Node(None, (), None, False), self)

    def record(self, op: Op, args: tuple, attrs: dict, value, res) -> Tensor:
        parents, needs = [], False
        for a in args:
            node = a.node if type(a) is Tensor and a.tape is self else None
            parents.append(node)
            needs = needs or (node is not None and node.needs_grad)
        if not (needs or self.trace):
            return Tensor(value)
        node = Node(op, parents, res, needs)
        if self.trace:
            self.records.append((node, args, attrs, value))
        return Tensor(value, node, self)

    def gradient(self, target: Tensor, sources, output_gradients=None, out: dict | None = None):
        """Gradients of `target` w.r.t. `sources` (a Tensor, list or dict), keyed like sources.

        `output_gradients` is the cotangent of `target` (default: ones). Sources that the target
        does not depend on get zeros. `out` (dict sources): arrays, each of its source's shape,
        that the dense gradients are returned in; a source's last VJP writes there directly where
        it can (no copy: a worker computes into shared memory this way), else the gradient is
        copied there. A gradient that comes as SparseRows is returned as such.
        """
        seed = output_gradients
        if seed is None:
            seed = np.ones_like(target.value)
        into = None
        if out:
            into = {sources[k].node: buf for k, buf in out.items() if type(sources[k]) is Tensor}
        grads = backward(target.node, seed, into=into) if target.node is not None else {}
        result = _map_sources(sources, lambda t: _grad_or_zeros(grads, t))
        for k, buf in (out or {}).items():
            g = result[k]
            if isinstance(g, np.ndarray) and g is not buf:
                np.copyto(buf, g)
                result[k] = buf
        return result


def _map_sources(sources, fn):
    if isinstance(sources, dict):
        return {k: fn(v) for k, v in sources.items()}
    if isinstance(sources, (list, tuple)):
        return [fn(v) for v in sources]
    return fn(sources)


def _grad_or_zeros(grads: dict, t: Tensor):
    g = grads.get(t.node) if type(t) is Tensor else None
    return np.zeros_like(value_of(t)) if g is None else g


def toposort(root: Node) -> list[Node]:
    """Nodes that `root` depends on through differentiable paths, parents before children.

    Nodes are numbered as they are created, and a node is always created after its parents,
    so the creation order of the reachable nodes is a topological order.
    """
    seen, stack = {root}, [root]
    while stack:
        for p in stack.pop().parents:
            if p is not None and p.needs_grad and p not in seen:
                seen.add(p)
                stack.append(p)
    return sorted(seen, key=_creation_order)


def backward(root: Node, seed, observe=None, into: dict | None = None) -> dict[Node, object]:
    """Reverse accumulation from `root` with cotangent `seed`; returns the leaves' gradients.

    `observe(node, i, parent, cotangent, contribution, accumulated)`, if given, sees every
    VJP step (graph mode compiles its replay from it). `into` ({leaf node: array}): a leaf's
    first contribution is written into its array when the VJP takes ``out`` (a later one is
    accumulated into a new array as usual; GradientTape.gradient copies the sum back).
    """
    grads = {root: seed}
    for node in reversed(toposort(root)):
        if node.op is None:
            continue
        g = grads.pop(node)  # an interior gradient is dead once its VJPs have run
        for i, parent in enumerate(node.parents):
            if parent is None or not parent.needs_grad:
                continue
            fn = node.op.vjp(i)
            buf = into.get(parent) if into and parent not in grads else None
            c = fn(g, node.res, out=buf) if buf is not None and _takes_out(fn) else fn(g, node.res)
            grads[parent] = accumulate(grads[parent], c) if parent in grads else c
            if observe is not None:
                observe(node, i, parent, g, c, grads[parent])
    return grads
