"""The op registry: every primitive's forward and its VJPs, side by side.

Each forward returns ``(value, residuals)`` and keeps only what its VJPs read. Each VJP maps
``(g, residuals) -> gradient of one argument``; `None` marks an argument with no gradient.
Broadcasting is undone by `unbroadcast` alone. Forwards and VJPs that take ``out`` can write
into a preallocated buffer of their result's shape; those that take ``ws`` (a workspace dict
kept per step of a graph-mode replay) keep their scratch arrays there instead of allocating them
anew each step. Eager mode passes neither, and both ways compute the same bits.
"""
from __future__ import annotations

import numpy as np

from asyncps.worker.autodiff.core import Op, PerArg, SparseRows, unbroadcast

REGISTRY: dict[str, Op] = {}


def defop(name: str, forward, *vjps, **flags) -> Op:
    """Create an Op (``flags``: `Op`'s in-place markers) and enter it in `REGISTRY` under `name`."""
    op = Op(name, forward, *vjps, **flags)
    REGISTRY[name] = op
    return op


def _scalar(x, like) -> np.ndarray:
    return np.asarray(x, dtype=like.dtype)


def _scratch(ws, key: str, shape: tuple, dtype, fill=None) -> np.ndarray:
    """An array for `key`: fresh without a workspace; with one, the array kept there (allocated
    on first use, filled with `fill` then). Arrays of the CNN run to 40 MiB: allocating one per
    step costs an mmap, page faults and the kernel's zeroing, every step."""
    buf = None if ws is None else ws.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
        if ws is not None:
            ws[key] = buf
    return buf


# ---------------------------------------------------------------- elementwise arithmetic


def _add(a, b, out=None):
    return np.add(a, b, out=out), (np.shape(a), np.shape(b))


def _sub(a, b, out=None):
    return np.subtract(a, b, out=out), (np.shape(a), np.shape(b))


def _mul(a, b, out=None):
    return np.multiply(a, b, out=out), (a, b)


def _div(a, b, out=None):
    return np.divide(a, b, out=out), (a, b)


def _pow(a, b):
    y = np.power(a, b)
    return y, (a, b, y)


def _pow_vjp_b(g, r):
    a, b, y = r
    log_a = np.log(np.where(a > 0, a, 1))  # d(a**b)/db = a**b log a, taken as 0 where a <= 0
    return unbroadcast(g * y * log_a, np.shape(b))


add = defop("add", _add, lambda g, r: unbroadcast(g, r[0]), lambda g, r: unbroadcast(g, r[1]))
sub = defop("sub", _sub, lambda g, r: unbroadcast(g, r[0]), lambda g, r: unbroadcast(-g, r[1]))
mul = defop(
    "mul", _mul,
    lambda g, r: unbroadcast(g * r[1], np.shape(r[0])),
    lambda g, r: unbroadcast(g * r[0], np.shape(r[1])),
)
div = defop(
    "div", _div,
    lambda g, r: unbroadcast(g / r[1], np.shape(r[0])),
    lambda g, r: unbroadcast(-g * r[0] / (r[1] * r[1]), np.shape(r[1])),
)
pow = defop(  # noqa: A001  (the op's name)
    "pow", _pow,
    lambda g, r: unbroadcast(g * r[1] * np.power(r[0], r[1] - 1), np.shape(r[0])),
    _pow_vjp_b,
)
neg = defop("neg", lambda x, out=None: (np.negative(x, out=out), None), lambda g, r: -g)

# ---------------------------------------------------------------- elementwise functions


def _exp(x, out=None):
    y = np.exp(x, out=out)
    return y, y


def _tanh(x, out=None):
    y = np.tanh(x, out=out)
    return y, y


def _sigmoid(x):
    y = np.tanh(x * 0.5)  # 1 / (1 + exp(-x)) without overflow for large |x|
    y += 1
    y *= 0.5
    return y, y


def _relu(x, out=None):
    y = np.maximum(x, 0, out=out)
    return y, y


exp = defop("exp", _exp, lambda g, y: g * y)
log = defop("log", lambda x, out=None: (np.log(x, out=out), x), lambda g, x: g / x)
tanh = defop("tanh", _tanh, lambda g, y: g * (1 - y * y))
sigmoid = defop("sigmoid", _sigmoid, lambda g, y: g * y * (1 - y))
relu = defop("relu", _relu, lambda g, y, out=None: np.multiply(g, y > 0, out=out),
             inplace_forward=True, inplace_vjp=True)

# ---------------------------------------------------------------- linear algebra


def _matmul(a, b, out=None):
    return np.matmul(a, b, out=out), (a, b)


def _matmul_vjp_a(g, r, out=None):
    a, b = r
    if a.ndim == b.ndim == 2:
        return np.matmul(g, b.T, out=out)
    return _into(out, unbroadcast(np.matmul(g, np.swapaxes(b, -1, -2)), a.shape))


def _matmul_vjp_b(g, r, out=None):
    a, b = r
    if a.ndim == b.ndim == 2:
        return np.matmul(a.T, g, out=out)
    return _into(out, unbroadcast(np.matmul(np.swapaxes(a, -1, -2), g), b.shape))


def _into(out, value):
    """`value`, copied into `out` when one is given (an ``out`` taken is an ``out`` returned)."""
    if out is None:
        return value
    np.copyto(out, value)
    return out


def _linear(x, w, b, out=None):
    y = np.matmul(x, w, out=out)
    y += b  # fused bias-add: no second array, and its VJP is a plain column sum
    return y, (x, w)


matmul = defop("matmul", _matmul, _matmul_vjp_a, _matmul_vjp_b)
linear = defop(
    "linear", _linear,
    lambda g, r, out=None: np.matmul(g, r[1].T, out=out),
    lambda g, r, out=None: np.matmul(r[0].T, g, out=out),
    lambda g, r, out=None: np.add.reduce(g, axis=0, out=out),
)

# ---------------------------------------------------------------- reductions


def _expand_back(g, shape, axis, keepdims) -> np.ndarray:
    """Broadcast a reduced gradient back to the input's shape, as a fresh writable array."""
    if axis is not None and not keepdims:
        g = np.expand_dims(g, axis)
    out = np.empty(shape, dtype=g.dtype)
    out[...] = g
    return out


def _sum(x, axis=None, keepdims=False):
    return np.asarray(np.sum(x, axis=axis, keepdims=keepdims)), (np.shape(x), axis, keepdims)


def _mean(x, axis=None, keepdims=False):
    y = np.asarray(np.mean(x, axis=axis, keepdims=keepdims))
    return y, (np.shape(x), axis, keepdims, np.size(x) // (y.size or 1))


def _max(x, axis=None, keepdims=False):
    y = np.max(x, axis=axis, keepdims=True)
    return np.asarray(y if keepdims else np.squeeze(y, axis)), (x, y, axis, keepdims)


def _max_vjp(g, r):
    x, y, axis, keepdims = r
    hit = x == y  # ties share the gradient equally, as TensorFlow's reduce_max does
    g = _expand_back(g, y.shape, axis, keepdims)
    return hit * (g / hit.sum(axis=axis, keepdims=True))


sum = defop("sum", _sum, lambda g, r: _expand_back(g, *r))  # noqa: A001
mean = defop("mean", _mean, lambda g, r: _expand_back(g / r[3], *r[:3]))
max = defop("max", _max, _max_vjp)  # noqa: A001

# ---------------------------------------------------------------- shapes and indexing


def _concat(*xs, axis=0):
    ends = np.cumsum([np.shape(x)[axis] for x in xs])
    return np.concatenate(xs, axis=axis), (ends, axis)


def _concat_vjp(g, r, i):
    ends, axis = r
    start = ends[i - 1] if i else 0
    return np.take(g, np.arange(start, ends[i]), axis=axis)


def _getitem(x, idx):
    return x[idx], (x.shape, x.dtype, idx)


def _getitem_vjp(g, r):
    shape, dtype, idx = r
    dx = np.zeros(shape, dtype)
    np.add.at(dx, idx, g)  # handles repeated integer-array indices; slices too
    return dx


def _gather(table, indices):
    return np.take(table, indices, axis=0), (indices, table.shape)


def _gather_vjp(g, r):
    indices, shape = r
    return SparseRows.from_duplicates(indices.ravel(), g.reshape((-1,) + shape[1:]), shape)


def _transpose_vjp(g, axes):
    return np.transpose(g, None if axes is None else np.argsort(axes))


reshape = defop("reshape", lambda x, shape: (np.reshape(x, shape), np.shape(x)), lambda g, s: g.reshape(s))
transpose = defop("transpose", lambda x, axes=None: (np.transpose(x, axes), axes), _transpose_vjp)
concat = defop("concat", _concat, PerArg(_concat_vjp))
getitem = defop("getitem", _getitem, _getitem_vjp)
gather = defop("gather", _gather, _gather_vjp, None)

# ---------------------------------------------------------------- convolution and pooling


def _same_pads(size, k, stride):
    """TensorFlow's SAME padding: output ceil(size / stride), extra pixel after."""
    out = -(-size // stride)
    total = (out - 1) * stride + k - size
    total = total if total > 0 else 0
    return out, total // 2, total - total // 2


def _geometry(h, w, kh, kw, stride, padding):
    """Output size and (top, bottom, left, right) padding for SAME or VALID."""
    if padding == "SAME":
        ho, top, bottom = _same_pads(h, kh, stride)
        wo, left, right = _same_pads(w, kw, stride)
        return ho, wo, (top, bottom, left, right)
    if padding == "VALID":
        return (h - kh) // stride + 1, (w - kw) // stride + 1, (0, 0, 0, 0)
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def _pad(x, pads, fill=0.0, ws=None):
    top, bottom, left, right = pads
    if not any(pads):
        return x
    n, h, w, c = x.shape
    # the border is filled once: later steps only rewrite the interior, and nothing writes to xp
    xp = _scratch(ws, "pad", (n, h + top + bottom, w + left + right, c), x.dtype, fill=fill)
    xp[:, top:top + h, left:left + w] = x
    return xp


def _windows(xp, kh, kw, ho, wo, stride):
    """Yield ((i, j), view) for each kernel offset: view[n, a, b] = xp[n, a*s + i, b*s + j]."""
    for i in range(kh):
        for j in range(kw):
            yield (i, j), xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]


def _im2col(xp, kh, kw, ho, wo, stride, ws=None):
    """Patches as rows (n*ho*wo, kh*kw*c), columns in the HWI order of an HWIO kernel."""
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    win = win[:, : stride * (ho - 1) + 1 : stride, : stride * (wo - 1) + 1 : stride]
    n, c = xp.shape[0], xp.shape[3]
    cols = _scratch(ws, "cols", (n * ho * wo, kh * kw * c), xp.dtype)
    np.copyto(cols.reshape(n, ho, wo, kh, kw, c), win.transpose(0, 1, 2, 4, 5, 3))
    return cols


def _conv2d(x, w, b=None, *, stride=1, padding="SAME", ws=None):
    kh, kw, c, o = w.shape
    ho, wo, pads = _geometry(x.shape[1], x.shape[2], kh, kw, stride, padding)
    cols = _im2col(_pad(x, pads, ws=ws), kh, kw, ho, wo, stride, ws)
    y = np.matmul(cols, w.reshape(-1, o), out=_scratch(ws, "y", (cols.shape[0], o), np.result_type(cols, w)))
    if b is not None:
        y += b
    return y.reshape(x.shape[0], ho, wo, o), (cols, w, x.shape, pads, stride)


def _conv2d_vjp_x(g, r, ws=None):
    _, w, xshape, pads, stride = r
    n, h, wd, c = xshape
    kh, kw, _, o = w.shape
    ho, wo = g.shape[1:3]
    g2 = g.reshape(-1, o)
    top, bottom, left, right = pads
    dxp = _scratch(ws, "dxp", (n, h + top + bottom, wd + left + right, c), g.dtype)
    dxp.fill(0)
    part = _scratch(ws, "part", (g2.shape[0], c), np.result_type(g, w))
    for (i, j), view in _windows(dxp, kh, kw, ho, wo, stride):
        # col2im one kernel offset at a time: no (rows, kh*kw*c) patch-gradient matrix
        view += np.matmul(g2, w[i, j].T, out=part).reshape(n, ho, wo, c)
    return dxp[:, top:top + h, left:left + wd]


def _conv2d_vjp_w(g, r, out=None):
    cols, w = r[0], r[1]
    dw = np.matmul(cols.T, g.reshape(-1, w.shape[3]), out=None if out is None else out.reshape(-1, w.shape[3]))
    return dw.reshape(w.shape) if out is None else out


def _pool_geometry(x, ksize, stride, padding):
    return _geometry(x.shape[1], x.shape[2], ksize, ksize, stride, padding)


def _max_pool2d(x, *, ksize=2, stride=2, padding="VALID", out=None, ws=None):
    ho, wo, pads = _pool_geometry(x, ksize, stride, padding)
    xp = _pad(x, pads, fill=-np.inf, ws=ws)
    views = [v for _, v in _windows(xp, ksize, ksize, ho, wo, stride)]
    if len(views) > 1:
        best = np.maximum(views[0], views[1], out=out)
    else:
        best = views[0].copy() if out is None else _into(out, views[0])
    for v in views[2:]:
        np.maximum(best, v, out=best)
    return best, (xp, best, x.shape, pads, ksize, stride)


def _max_pool2d_vjp(g, r, ws=None):
    xp, best, (n, h, w, c), pads, ksize, stride = r
    ho, wo = best.shape[1:3]
    dxp = _scratch(ws, "dxp", xp.shape, g.dtype)
    dxp.fill(0)  # pixels in no window (VALID, or stride > ksize) get no gradient
    pending = _scratch(ws, "pending", best.shape, np.dtype(bool))
    pending.fill(True)  # windows whose maximum has not been routed yet
    hit = _scratch(ws, "hit", best.shape, np.dtype(bool))
    for (_, xv), (_, dv) in zip(_windows(xp, ksize, ksize, ho, wo, stride), _windows(dxp, ksize, ksize, ho, wo, stride)):
        np.equal(xv, best, out=hit)
        hit &= pending  # ties go to the first position in the window, as in TensorFlow
        pending ^= hit
        if ksize <= stride:
            np.multiply(g, hit, out=dv)  # windows do not overlap: each pixel written once
        else:
            dv += g * hit
    top, left = pads[0], pads[2]
    return dxp[:, top:top + h, left:left + w]


conv2d = defop(
    "conv2d", _conv2d, _conv2d_vjp_x, _conv2d_vjp_w,
    lambda g, r, out=None: np.add.reduce(g.reshape(-1, g.shape[3]), axis=0, out=out),
)
max_pool2d = defop("max_pool2d", _max_pool2d, _max_pool2d_vjp)

# ---------------------------------------------------------------- regularisation and losses


def _dropout(x, *, rate, rng, out=None, ws=None):
    """Inverted dropout: keep with probability 1 - rate and scale by 1 / (1 - rate)."""
    draw = rng.random(x.shape, dtype=np.float32, out=None if ws is None else _scratch(ws, "draw", x.shape, np.float32))
    keep = np.greater_equal(draw, rate, out=None if ws is None else _scratch(ws, "keep", x.shape, np.dtype(bool)))
    mask = np.multiply(keep, _scalar(1.0 / (1.0 - rate), x), dtype=x.dtype,
                       out=None if ws is None else _scratch(ws, "mask", x.shape, x.dtype))
    return np.multiply(x, mask, out=out), mask


def _row_max(x):
    # numpy reduces a short inner axis slowly; the transposed copy reduces the long axis instead
    return np.maximum.reduce(np.ascontiguousarray(x.T), axis=0)


def _softmax_ce(logits, labels):
    """Mean over the batch of -log softmax(logits)[label], via a max-shifted log-sum-exp."""
    n = len(labels)
    z = logits - _row_max(logits)[:, None]
    e = np.exp(z)
    s = e @ np.ones(e.shape[1], e.dtype)  # row sums as a mat-vec, faster than a short-axis sum
    loss = np.add.reduce(np.log(s) - z[np.arange(n), labels]) / n
    e /= s[:, None]  # the probabilities, the only residual the VJP needs
    return np.asarray(loss, logits.dtype), (e, labels)


def _softmax_ce_vjp(g, r, out=None):
    probs, labels = r
    scale = g / len(labels)
    d = np.multiply(probs, scale, out=out)
    d[np.arange(len(labels)), labels] -= scale
    return d


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e, (e, axis)


def _softmax_vjp(g, r):
    y, axis = r
    gy = g * y
    return gy - y * gy.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    y = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return y, (y, axis)


def _log_softmax_vjp(g, r):
    y, axis = r
    return g - np.exp(y) * g.sum(axis=axis, keepdims=True)


dropout = defop("dropout", _dropout, lambda g, mask, out=None: np.multiply(g, mask, out=out), inplace_vjp=True)
softmax_cross_entropy = defop("softmax_cross_entropy", _softmax_ce, _softmax_ce_vjp, None)
l2_loss = defop("l2_loss", lambda x: (np.asarray(np.sum(x * x) / 2), x), lambda g, x: g * x)
softmax = defop("softmax", _softmax, _softmax_vjp)
log_softmax = defop("log_softmax", _log_softmax, _log_softmax_vjp)
