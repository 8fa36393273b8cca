"""Gradient compression with error feedback: 16-bit floats on the wire, nothing lost over time.

    compress = make_compressor(cfg.cluster.compression)   # None for "none"
    wire = compress(grads)      # {name: float16 / bfloat16 array, or SparseRows of them}

`PSClient` applies it to every push when ``cluster.compression`` is ``fp16`` or ``bf16``; the
shard widens the values back to float32 before validating them (asyncps.ps.validate). Pulls
stay float32.

Error feedback (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "EF-SGD"). Per
variable the compressor keeps a float32 residual e, the part of past gradients that rounding
has not delivered yet. For each push, with Q the rounding to the wire type:

    a = g + e        q = Q(a)        e <- a - widen(q)        send q

so after T pushes  sum_t widen(q_t) = sum_t g_t - e_T : the updates the shard applies add up
to the true gradients minus one residual, and |e_T| is at most half a quantum of the wire type
at |a_T| (rounding to nearest). A gradient component too small to show in 16 bits is not lost;
it accumulates until it does.

Choices:
- float16 has 10 mantissa bits and a range of +-65504; bfloat16 has 7 bits and float32's range.
  A finite value beyond the wire type's largest is sent saturated (+-largest) and the excess
  stays in e, so compression never turns a finite gradient into Inf.
- A gradient with NaN or Inf is sent as is (the shard rejects it, as it would uncompressed, with
  an error naming the variable) and that variable's residual is reset to zero, so one bad
  gradient does not poison every later push.
- Sparse rows (embedding gradients): duplicate rows are summed first; the residual is dense
  (the variable's full shape) and a row's residual travels with that row's next gradient.
- Only float32 gradients are compressed; other dtypes pass through unchanged.
- A push that fails after compression loses its gradient, exactly as an uncompressed one does;
  the residual is not rolled back.

Cost (measured in docs/performance.md): bf16 is six passes over the gradient on the worker (add,
a sum of squares, four of integer rounding) and one on the shard; fp16 about 25 on the worker
and 10 on the shard (numpy's own float16 cast is scalar code, slower still). On loopback either
costs more CPU than sending half the bytes saves; it pays where the link is the bottleneck.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from asyncps.protos import codec
from asyncps.sparse import SparseRows

KINDS = ("none", "fp16", "bf16")
BFLOAT16_MAX = float(np.uint32(0x7F7F0000).view(np.float32))  # about 3.39e38


def make_compressor(kind: str) -> "ErrorFeedback | None":
    """The compressor for a ``cluster.compression`` value (None for "none")."""
    if kind not in KINDS:
        raise ValueError(f"cluster.compression must be one of {', '.join(KINDS)}, got {kind!r}")
    return None if kind == "none" else ErrorFeedback(kind)


def quantize(a: np.ndarray, kind: str) -> np.ndarray:
    """Finite `a` (float32, within the wire type's range) rounded to the nearest value of the
    wire type, ties away from zero: float16, or codec.BFLOAT16."""
    if kind == "fp16":
        return codec.float16_from_float32(a)  # (finite, saturated input: see ErrorFeedback._round)
    return codec.bfloat16_from_float32(a)


class ErrorFeedback:
    """Compresses gradients to `kind` ("fp16" or "bf16"), keeping a residual per variable."""

    def __init__(self, kind: str):
        if kind not in ("fp16", "bf16"):
            raise ValueError(f"unknown compression {kind!r} (expected fp16 or bf16)")
        self.kind = kind
        self.largest = codec.FLOAT16_MAX if kind == "fp16" else BFLOAT16_MAX
        # Below this sum of squares no element can exceed `largest` (bf16: any finite sum).
        self._safe_sum = self.largest * self.largest if kind == "fp16" else float("inf")
        self.residual: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}  # bf16: one float32 buffer per variable

    def __call__(self, grads: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.compress(name, g) for name, g in grads.items()}

    def compress(self, name: str, grad):
        """One variable's gradient (dense array or SparseRows) in the wire type."""
        if isinstance(grad, SparseRows):
            return self._sparse(name, grad)
        grad = np.asarray(grad)
        if grad.dtype != np.float32:
            return grad
        e = self._residual(name, grad.shape)
        e += grad  # a = g + e, in the residual's buffer
        wide = None
        if self.kind == "bf16":
            wide = self._scratch.get(name)
            if wide is None or wide.shape != e.shape:
                wide = self._scratch[name] = np.empty_like(e)
        return self._round(e, wide)

    def _round(self, a: np.ndarray, wide: np.ndarray | None = None) -> np.ndarray:
        """q = Q(a) (saturated), and `a` becomes the new residual a - widen(q), in place."""
        flat = a.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            squares = np.dot(flat, flat)  # one BLAS pass: NaN/Inf and large values show here
        if not np.isfinite(squares) and not np.isfinite(a).all():
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf travel as they are: the shard rejects them
                q = a.astype(np.float16) if self.kind == "fp16" else codec.bfloat16_from_float32(a)
            a[...] = 0.0
            return q
        if not squares < self._safe_sum:
            q = quantize(np.clip(a, -self.largest, self.largest), self.kind)
        elif self.kind == "bf16" and wide is not None:
            return self._round_bf16(a, wide)
        else:
            q = quantize(a, self.kind)
        a -= codec.widen(q)
        return q

    @staticmethod
    def _round_bf16(a: np.ndarray, wide: np.ndarray) -> np.ndarray:
        """bfloat16 rounding of a finite `a` with a scratch float32 buffer, in four passes of
        integer arithmetic on the bits: q = (bits(a) + 0x8000) >> 16, wide = q << 16 (the
        float32 widen(q)), a -= wide. Same result as `quantize` + `widen`."""
        bits = wide.view("<u4")
        np.add(a.view("<u4"), np.uint32(0x8000), out=bits)  # carries into the exponent when rounding up
        q = np.empty(a.shape, "<u2")
        np.right_shift(bits, np.uint32(16), out=q, casting="unsafe")
        np.left_shift(q, np.uint32(16), out=bits, casting="unsafe")  # computed in uint32
        a -= wide
        return q.view(codec.BFLOAT16)

    def _sparse(self, name: str, grad: SparseRows) -> SparseRows:
        values = np.asarray(grad.values)
        if values.dtype != np.float32:
            return grad
        rows = np.asarray(grad.rows, dtype=np.int64)
        if len(np.unique(rows)) != len(rows):
            grad = SparseRows.from_duplicates(rows, values, grad.dense_shape)
            rows, values = grad.rows, grad.values
        height = grad.dense_shape[0] if grad.dense_shape else (int(rows.max()) + 1 if rows.size else 0)
        e = self._residual(name, (height, *values.shape[1:]), grow=True)
        a = values + e[rows]
        q = self._round(a)  # `a` is now the residual of these rows
        e[rows] = a
        return SparseRows(rows, q, grad.dense_shape)

    def _residual(self, name: str, shape: tuple, grow: bool = False) -> np.ndarray:
        e = self.residual.get(name)
        if e is None or (e.shape != shape and not grow):
            e = self.residual[name] = np.zeros(shape, np.float32)
        elif grow and (e.shape[1:] != shape[1:] or e.shape[0] < shape[0]):
            bigger = np.zeros((max(shape[0], e.shape[0] if e.shape[1:] == shape[1:] else 0), *shape[1:]), np.float32)
            if e.shape[1:] == shape[1:]:
                bigger[: e.shape[0]] = e
            e = self.residual[name] = bigger
        return e
