"""The tensor codec: the one place that turns numpy arrays into `Tensor` messages and back.

A tensor travels as raw little-endian C-order bytes plus dtype name and shape. Tensors larger
than ``chunk_bytes`` (1 MiB) are cut into pieces that travel in consecutive messages of one
stream; small tensors are packed several to a message. Every stream message type that carries
tensors has a ``repeated Tensor tensors`` field, so one encoder (`encode_wire`) and one assembler
(`Assembler.add_wire`) serve Init, Pull, Push, PushPull, Snapshot and Restore. Both work on the
serialized bytes directly (see "The fast path" below); the protobuf-object encoder and decoder,
the slow and obviously-standard way, live in tests/wire_oracle.py as the oracle the tests check
this codec against.

>>> msgs = list(encode_wire({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
>>> asm = Assembler()
>>> for m in msgs:
...     _ = asm.add_wire(m)
>>> asm.finish()["w"]
array([[0., 1., 2.],
       [3., 4., 5.]], dtype=float32)
"""
from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from asyncps.protos.wire_types import Snapshot, SparseRows  # noqa: F401  (Snapshot re-exported for the codec's callers)

CHUNK_BYTES = 1 << 20  # bytes of tensor data per stream message (see bench/transport.py)
OWNED_SLACK = 64 << 10  # bytes a message may carry beside a tensor before the tensor is copied out of it
MAX_TENSOR_BYTES = 1 << 36  # 64 GiB: a declared size above this is rejected before allocating
_MIN_PIECE = 64 << 10  # start a new message rather than send a piece smaller than this

_DTYPE_NAMES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
DTYPES: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<") for name in _DTYPE_NAMES}
# bfloat16 travels as the top 16 bits of a float32 (2 bytes, little-endian) with the tag
# "bfloat16". numpy has no such type, so here it is a one-field record of the bits: arrays of it
# are carried, not computed with; `widen` gives float32 (see `bfloat16_from_float32`). Arrays of
# ml_dtypes.bfloat16, where that package is installed, are accepted by the encoder too.
BFLOAT16 = np.dtype([("bfloat16", "<u2")])
DTYPES["bfloat16"] = BFLOAT16


class CodecError(ValueError):
    """A Tensor message (or a stream of pieces) that does not describe a valid tensor."""


def dtype_of(name: str) -> np.dtype:
    """The little-endian numpy dtype for a whitelisted dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CodecError(f"unsupported dtype {name!r} (expected one of: {', '.join(DTYPES)})") from None


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; rejects dtypes outside the whitelist."""
    name = _WIRE_NAMES.get(dtype)  # the common case: a whitelisted little-endian dtype (one lookup)
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16 or dtype.name == "bfloat16":  # ours, or ml_dtypes'
        return "bfloat16"
    name = dtype.name
    dtype_of(name)
    return name


# ----------------------------------------------------------------------------------------------
# Reduced-precision floats (gradient compression, asyncps.compression)

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def bfloat16_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 -> BFLOAT16: the top 16 bits, rounded to nearest (ties away from zero).

    Finite values above bfloat16's largest (about 3.39e38) round to Inf, as IEEE rounding does;
    NaN stays NaN. Two passes over the data (add-and-shift, narrow), plus one on NaN input.
    """
    x = np.asarray(x, dtype="<f4", order="C")
    bits = np.add(x.view("<u4"), np.uint32(0x8000), out=np.empty(x.shape, "<u4"))  # carries into the exponent
    out = np.right_shift(bits, np.uint32(16), out=np.empty(x.shape, "<u2"), casting="unsafe")
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = not flat.size or np.isfinite(np.dot(flat, flat))
    if not finite:  # NaN bits may have wrapped to +-0 above
        out[np.isnan(x)] = 0x7FC0
    return out.view(BFLOAT16)


def float32_from_bfloat16(b: np.ndarray) -> np.ndarray:
    """BFLOAT16 (or ml_dtypes.bfloat16, or its uint16 bits) -> float32, exactly."""
    bits = np.asarray(b).view("<u2")
    wide = np.empty(bits.shape, "<u4")
    np.left_shift(bits, np.uint32(16), out=wide, casting="unsafe")  # one pass, computed in uint32
    return wide.view("<f4")


def float16_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 rounded to nearest (ties away from zero), for finite |x| <= 65504.

    numpy's own cast is scalar code here (0.6 ms for 200k values, 20 ms and more when many are
    float16 subnormals, as small gradients are); this is ten vectorized integer passes. Values
    below 2^-14 (float16 subnormals) come from adding 0.5 in float32, which rounds them to a
    multiple of 2^-24; `minimum` picks that result where the normal-range formula wrapped.
    Callers saturate first (asyncps.compression); NaN, Inf and larger values give garbage.
    """
    x = np.asarray(x, dtype="<f4", order="C")
    shape, u = x.shape, x.reshape(-1).view("<u4")  # 1-d: numpy gives scalars for 0-d operands
    ab = np.bitwise_and(u, np.uint32(0x7FFFFFFF))
    h = np.add(ab, np.uint32((0x1000 - (113 << 23)) & 0xFFFFFFFF))  # rebias the exponent, round
    h >>= np.uint32(13)  # (|x| < 2^-14 wrapped around: huge, so `minimum` drops it)
    h += np.uint32(1 << 10)
    sub = np.add(ab.view("<f4"), np.float32(0.5), out=ab.view("<f4")).view("<u4")
    sub -= np.uint32(0x3F000000)  # |x| < 2^-14: the subnormal's bits; larger |x|: more than h
    np.minimum(h, sub, out=h)
    out = np.right_shift(u, np.uint32(16), out=np.empty(u.shape, "<u2"), casting="unsafe")
    out &= np.uint16(0x8000)
    np.bitwise_or(out, h, out=out, casting="unsafe")
    return out.view(np.float16).reshape(shape)


def float32_from_float16(h: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly (NaN and Inf included), vectorized (see float16_from_float32)."""
    b = np.asarray(h).view("<u2")
    shape, b = b.shape, b.reshape(-1)
    if b.size and np.bitwise_and(b, np.uint16(0x7FFF)).max() >= 0x7C00:
        return b.view(np.float16).astype(np.float32).reshape(shape)  # NaN/Inf: numpy's cast (rejected later)
    o = np.left_shift(b, np.uint32(13), out=np.empty(b.shape, "<u4"), casting="unsafe")
    sign = np.bitwise_and(o, np.uint32(0x10000000))
    o ^= sign
    sign <<= np.uint32(3)
    alt = np.add(o, np.uint32(113 << 23))
    o += np.uint32(112 << 23)  # normal values: rebias the exponent
    f, a = o.view("<f4"), alt.view("<f4")
    a -= np.float32(2.0**-14)  # subnormals: m * 2^-24 (for normal values this is larger than f)
    np.minimum(f, a, out=f)  # (for subnormals f = 2^-15 + m * 2^-25 is the larger one)
    o |= sign
    return f.reshape(shape)


def widen(array: np.ndarray) -> np.ndarray:
    """float32 values of a float16 or bfloat16 array (exact: every such value is a float32)."""
    if array.dtype == BFLOAT16 or array.dtype.name == "bfloat16":
        return float32_from_bfloat16(array)
    if array.dtype == np.float16:
        return float32_from_float16(array)
    return array.astype(np.float32)


def is_reduced_float(dtype: np.dtype) -> bool:
    """True for the 16-bit float wire types a float32 variable accepts (float16, bfloat16)."""
    return dtype == np.float16 or dtype == BFLOAT16 or dtype.name == "bfloat16"


# ----------------------------------------------------------------------------------------------
# Encoding


_WIRE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}  # little-endian dtypes only


def _wire_array(array: Any) -> np.ndarray:
    """A C-contiguous little-endian view (or copy, only when needed) of `array`."""
    if type(array) is np.ndarray and array.flags.c_contiguous and array.dtype in _WIRE_NAMES:
        return array  # the common case, without numpy's slower conversions
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: carried as our record of its bits
        return np.ascontiguousarray(array).view("<u2").view(BFLOAT16).reshape(array.shape)
    le = dtype_of(dtype_name(array.dtype))
    return np.asarray(array, dtype=le, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


wire_array = _wire_array  # public name (the shared-memory transport writes wire arrays too)


def _pieces(value) -> tuple[np.ndarray, bytes, bool]:
    """(data array, row-index bytes, sparse flag) of a dense array or SparseRows."""
    if isinstance(value, SparseRows):
        rows = np.ascontiguousarray(value.rows, dtype="<i8")
        values = _wire_array(value.values)
        if rows.ndim != 1 or values.ndim < 1 or values.shape[0] != rows.shape[0]:
            raise CodecError(f"sparse rows: {rows.shape} indices for values of shape {values.shape}")
        return values, rows.tobytes(), True
    return _wire_array(value), b"", False


wire_pieces = _pieces  # public name: the shared-memory transport carries sparse rows the same way


def _items(tensors) -> Iterator[tuple[str, str, Any]]:
    """(name, slot, value) from a mapping name -> value or an iterable of such triples."""
    if isinstance(tensors, Mapping):
        for name, value in tensors.items():
            yield name, "", value
    else:
        yield from tensors


# ----------------------------------------------------------------------------------------------
# Decoding


class BufferPool:
    """Reusable byte buffers, by size: the receive buffers of tensors that arrive in pieces, and
    the servicer's pull snapshots.

    Fresh memory costs page faults: writing a new 256 MiB np.empty once takes about twice as long
    as a memcpy into a buffer already mapped (46 against 20 ms here). A buffer is handed out again
    only when nothing but the pool refers to it (CPython's reference count: every array, view or
    memoryview of it holds a reference), so a caller that keeps a decoded tensor keeps its memory
    to itself, and one that drops it gives it back without saying so. At most `max_bytes` are
    kept (idle buffers of other sizes are dropped to make room); buffers below `min_bytes` are
    plain allocations (malloc reuses small blocks well enough).
    """

    def __init__(self, max_bytes: int = 1 << 30, min_bytes: int = CHUNK_BYTES):
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self._held: dict[int, list[np.ndarray]] = {}  # by size: buffers handed out, idle or not
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0  # buffers handed out again (tests, benchmarks)

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of `nbytes` (contents undefined); MemoryError as np.empty."""
        if nbytes < self.min_bytes:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            held = self._held.setdefault(nbytes, [])
            for buf in held:
                if sys.getrefcount(buf) <= _IDLE_REFS:
                    self.reused += 1
                    return buf
            if self._bytes + nbytes > self.max_bytes:
                self._drop_idle(nbytes)
            buf = np.empty(nbytes, np.uint8)
            if self._bytes + nbytes <= self.max_bytes:
                held.append(buf)
                self._bytes += nbytes
            return buf

    def _drop_idle(self, room: int) -> None:
        """Forgets idle buffers until `room` more bytes fit (caller holds the lock)."""
        for size, held in list(self._held.items()):
            for buf in list(held):
                if self._bytes + room <= self.max_bytes:
                    return
                if sys.getrefcount(buf) <= _IDLE_REFS + 1:  # (+1: this loop's copy of the list)
                    self._remove(size, buf)
            if not held:
                del self._held[size]

    def forget(self, buf: np.ndarray) -> None:
        """Never hands `buf` out again: its memory goes back to the system with its last
        reference (what a failed or cancelled stream received must not stay held)."""
        with self._lock:
            self._remove(buf.nbytes, buf)

    def _remove(self, size: int, buf: np.ndarray) -> None:
        held = self._held.get(size, [])
        for i, b in enumerate(held):
            if b is buf:  # (by identity: == on arrays compares their elements)
                del held[i]
                self._bytes -= size
                return


def _idle_refs() -> int:
    """sys.getrefcount of a buffer that only a BufferPool's list refers to, seen from the
    `for buf in held` loop of `take` (-1 where there is no reference count: never reused)."""
    if not hasattr(sys, "getrefcount"):
        return -1
    for buf in [np.empty(0)]:
        return sys.getrefcount(buf)
    return -1


_IDLE_REFS = _idle_refs()


class _Partial:
    """A tensor whose pieces are still arriving."""

    __slots__ = ("dtype", "shape", "sparse", "rows", "buf", "received")

    def __init__(self, dtype, shape, sparse, rows, total, pool: BufferPool | None = None):
        self.dtype, self.shape, self.sparse, self.rows = dtype, shape, sparse, rows
        try:
            self.buf = np.empty(total, dtype=np.uint8) if pool is None else pool.take(total)
        except MemoryError:  # a declared size this process cannot hold: the sender's error, not ours
            raise CodecError(f"tensor declares {total} bytes, more than this process can allocate") from None
        self.received = 0


def _header(piece) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validated (dtype, shape, total) of a piece; total checked against shape and dtype."""
    dtype = dtype_of(piece.dtype)
    shape = tuple(piece.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor {piece.name!r}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if piece.total != expected:
        raise CodecError(
            f"tensor {piece.name!r}: {piece.total} bytes declared, but shape {shape} of "
            f"{dtype.name} needs {expected}"
        )
    if expected > MAX_TENSOR_BYTES:
        raise CodecError(f"tensor {piece.name!r}: {expected} bytes exceeds the limit of {MAX_TENSOR_BYTES}")
    return dtype, shape, expected


def row_indices(piece, shape) -> np.ndarray | None:
    """The int64 row indices of a sparse first piece (None for a dense one); `piece` has
    `name`, `sparse` and `rows` (a wire Tensor's, or a shared-memory ShmTensor's)."""
    if not piece.sparse:
        return None
    raw = piece.rows
    if not shape or len(raw) != 8 * shape[0]:
        raise CodecError(
            f"tensor {piece.name!r}: sparse values of shape {shape} need {8 * (shape[0] if shape else 0)} "
            f"bytes of int64 row indices, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype="<i8")


def _finished(dtype, shape, rows, flat) -> np.ndarray | SparseRows:
    values = flat.view(dtype).reshape(shape) if flat.dtype != dtype else flat.reshape(shape)
    return values if rows is None else SparseRows(rows, values)


# admit(name, slot, dtype, shape, sparse, nbytes): called once per tensor of a stream, with its
# validated declaration (nbytes: data plus sparse row indices), before any buffer is allocated
# for it; raises to refuse the tensor (and so the stream).
Admit = Callable[[str, str, np.dtype, tuple, bool, int], None]


class Assembler:
    """Reassembles the Tensor pieces of one stream, checking order, sizes and completeness.

    Feed every serialized message to `add_wire`, then call `finish`. Errors raise CodecError
    naming the tensor: unknown dtype, shape and byte count that disagree, a piece out of order
    or missing, a piece past the declared end, a tensor sent twice, or (at `finish`) a stream
    that ended before a tensor was complete. `admit` (see `Admit`) vets each tensor's
    declaration before anything is allocated for it: the shard checks names, dtypes, shapes and
    its byte budget there.
    """

    def __init__(self, admit: Admit | None = None, pool: BufferPool | None = None) -> None:
        self._done: dict[tuple[str, str], np.ndarray | SparseRows] = {}
        self._partial: dict[tuple[str, str], _Partial] = {}
        self.nbytes = 0  # data bytes received, for accounting
        self._admit = admit  # vets each tensor's declaration before anything is allocated for it
        self._pool = pool  # where tensors in several pieces are reassembled (None: fresh memory)
        self._taken: list[np.ndarray] = []  # buffers from the pool (forgotten by `clear`)

    def clear(self) -> None:
        """Drops every tensor received so far (their buffers are freed with the last reference):
        for a stream that failed or was cancelled. Pooled buffers are forgotten too, so that their
        memory is returned now instead of kept for reuse."""
        if self._pool is not None:
            for buf in self._taken:
                self._pool.forget(buf)
        self._taken.clear()
        self._done.clear()
        self._partial.clear()

    def _add_piece(self, piece) -> None:
        key = (piece.name, piece.slot)
        data = piece.data  # read once: every read of a bytes field copies
        self.nbytes += len(data)
        partial = self._partial.get(key)
        if partial is None:
            self._first_piece(key, piece, data)
        else:
            self._next_piece(key, partial, piece, data)

    def _first_piece(self, key, piece, data: bytes) -> None:
        label = _label(key)
        if key in self._done:
            raise CodecError(f"tensor {label}: sent twice in one stream")
        dtype, shape, total = _header(piece)
        if self._admit is not None:  # before the buffer: a refused declaration allocates nothing
            self._admit(piece.name, piece.slot, dtype, shape, bool(piece.sparse), total + len(piece.rows))
        if piece.offset != 0:
            raise CodecError(f"tensor {label}: first piece starts at byte {piece.offset}, expected 0 (missing or out-of-order chunk)")
        if len(data) > total:
            raise CodecError(f"tensor {label}: piece of {len(data)} bytes exceeds the declared total of {total}")
        rows = row_indices(piece, shape)
        if len(data) == total:  # whole tensor in one piece: no copy beyond the field read
            self._done[key] = _finished(dtype, shape, rows, np.frombuffer(data, dtype=dtype))
            return
        partial = _Partial(dtype, shape, piece.sparse, rows, total, self._pool)
        if self._pool is not None:
            self._taken.append(partial.buf)
        partial.buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        partial.received = len(data)
        self._partial[key] = partial

    def _next_piece(self, key, partial: _Partial, piece, data: bytes) -> None:
        label = _label(key)
        if (piece.dtype, tuple(piece.shape), piece.total, piece.sparse) != (
            _WIRE_NAMES[partial.dtype], partial.shape, len(partial.buf), partial.sparse
        ):
            raise CodecError(f"tensor {label}: a later piece disagrees with the first on dtype, shape or size")
        if piece.offset != partial.received:
            raise CodecError(
                f"tensor {label}: piece at byte {piece.offset}, expected {partial.received} "
                "(missing or out-of-order chunk)"
            )
        end = partial.received + len(data)
        if end > len(partial.buf):
            raise CodecError(f"tensor {label}: piece ends at byte {end}, past the declared total of {len(partial.buf)}")
        partial.buf[partial.received : end] = np.frombuffer(data, dtype=np.uint8)
        partial.received = end
        if end == len(partial.buf):
            del self._partial[key]
            self._done[key] = _finished(partial.dtype, partial.shape, partial.rows, partial.buf)

    def add_wire(self, message: bytes) -> bytes | None:
        """Takes one serialized stream message; returns its header's bytes (None: no header).

        The tensors are parsed from the bytes directly (see `encode_wire`); data is not copied.
        """
        return _add_wire(self, message)

    def finish(self) -> dict[str, np.ndarray | SparseRows]:
        """Values (slot "") by name; raises CodecError if any tensor is incomplete."""
        self._check_complete()
        return {name: v for (name, slot), v in self._done.items() if not slot}

    def slots(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer slots by variable name, then slot name (Snapshot/Restore streams)."""
        self._check_complete()
        out: dict[str, dict[str, np.ndarray]] = {}
        for (name, slot), value in self._done.items():
            if slot:
                out.setdefault(name, {})[slot] = dense(value, f"slot {slot!r} of {name!r}")
        return out

    def _check_complete(self) -> None:
        for key, partial in self._partial.items():
            raise CodecError(
                f"tensor {_label(key)}: stream ended after {partial.received} of {len(partial.buf)} bytes (truncated)"
            )


def dense(value: np.ndarray | SparseRows, what: str) -> np.ndarray:
    """`value` if it is a dense array; CodecError naming `what` for sparse rows (a stream where
    only dense tensors belong: Init, snapshots, optimizer slots)."""
    if isinstance(value, SparseRows):
        raise CodecError(f"tensor {what}: sparse rows where a dense tensor belongs")
    return value


def _label(key: tuple[str, str]) -> str:
    name, slot = key
    return repr(name) if not slot else f"{name!r} slot {slot!r}"


# ----------------------------------------------------------------------------------------------
# The fast path: stream messages as wire bytes, without protobuf objects for the tensor data.
#
# Every tensor-carrying stream message (InitChunk, PullChunk, PushChunk, SnapshotChunk) has its
# header in field 1 and ``repeated Tensor tensors = 2``. `encode_wire` writes such a message's
# protobuf encoding directly: the small fields through a protobuf Tensor, then the data field
# appended from a memoryview of the array, so each byte is copied once (by ``bytes.join``)
# instead of four times (slice, arena, serialize, gRPC). `Assembler.add_wire` parses the same
# bytes with a few lines of wire-format reading and wraps the data with ``np.frombuffer`` on a
# memoryview: no copy for a whole tensor. Both produce and accept standard protobuf, so peers
# using the generated classes interoperate (tests/test_codec.py checks this).

_LEN = 2  # wire type of length-delimited fields
_VARINT = 0


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64: ten-byte two's complement, as protobuf does
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_prefix(field_number: int, length: int) -> bytes:
    return _varint(field_number << 3 | _LEN) + _varint(length)


_DATA_FIELD = 4  # Tensor.data
_TENSORS_FIELD = 2  # <Stream>Chunk.tensors
_HEADER_FIELD = 1  # <Stream>Chunk.header


def encode_wire(
    tensors: Mapping[str, Any] | Iterable[tuple[str, str, Any]],
    header: bytes | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Serialized stream messages carrying `tensors`; `header` (a serialized header message,
    possibly empty) goes into the first. Same layout and chunking as the protobuf-object
    encoder in tests/wire_oracle.py, which the tests compare byte for byte.

    Per tensor the work is a dict lookup: the framing of a whole dense tensor (field tags,
    name, dtype, shape, sizes) depends only on those, and is cached.
    """
    parts: list = [] if header is None else [_field_prefix(_HEADER_FIELD, len(header)), header]
    used, size = 0, sum(map(len, parts))  # data bytes; bytes of the message so far
    for name, slot, value in _items(tensors):
        array, rows, sparse = _pieces(value)
        data = array.data.cast("B") if array.size else _NO_DATA
        total, offset = len(data), 0
        while True:
            room = chunk_bytes - used
            if used and (room < min(_MIN_PIECE, total - offset) or room <= 0):
                yield b"".join(parts)
                parts, used, size, room = [], 0, 0, chunk_bytes
            n = min(room, total - offset)
            if n == total and not sparse:  # the whole tensor in this message, its data aligned
                key = (name, slot, array.dtype, array.shape, size % ALIGN)
                framing = _FRAMING.get(key)
                if framing is None:
                    framing = _aligned_framing(name, slot, _WIRE_NAMES[array.dtype], array.shape, total, size)
                    if len(_FRAMING) >= _FRAMING_MAX:
                        _FRAMING.clear()
                    _FRAMING[key] = framing
                parts += [framing, data]
            else:
                framing = _framing(name, slot, _WIRE_NAMES[array.dtype], array.shape, offset, total, sparse,
                                   rows if offset == 0 else b"", n)
                parts += [framing, data[offset : offset + n]]
            size += len(framing) + n
            used += max(n, 1)
            offset += n
            if offset >= total:
                break
    yield b"".join(parts)


_NO_DATA = memoryview(b"")
_FRAMING: dict[tuple, bytes] = {}  # (name, slot, dtype, shape) -> framing of the whole tensor
_FRAMING_MAX = 1 << 14


def _len_field(number: int, payload: bytes) -> bytes:
    return _field_prefix(number, len(payload)) + payload


def _framing(name: str, slot: str, dtype: str, shape: tuple, offset: int, total: int, sparse: bool,
             rows: bytes, n: int) -> bytes:
    """The bytes of one ``tensors`` entry up to its data: the entry's tag and length, the
    Tensor's fields other than ``data`` (proto3 rules: default values are left out), then the
    ``data`` tag and length. The ``n`` data bytes follow."""
    meta_bytes = _meta(name, slot, dtype, shape, offset, total, sparse, rows)
    data_prefix = _field_prefix(_DATA_FIELD, n)
    return _field_prefix(_TENSORS_FIELD, len(meta_bytes) + len(data_prefix) + n) + meta_bytes + data_prefix


# Whole tensors are decoded without a copy (np.frombuffer on the received message), so where
# their data lands in the message decides whether numpy sees an aligned array. Unaligned float32
# data costs every later pass: a BLAS dot (the shard's finiteness check) 7x, an elementwise pass
# (SGD) about 2x, a matmul a copy. The encoder therefore starts each whole tensor's data at a
# multiple of ALIGN bytes of the message (Python's bytes keep their data 16-byte aligned), by
# writing up to four of the entry's varints (the two tags and the two lengths) with redundant
# continuation bytes: standard protobuf, which every parser reads (5 bytes at most each, as
# upb accepts; tests/test_codec.py checks the generated classes parse it).
ALIGN = 8
_MAX_VARINT32 = 5


def _varint_n(value: int, length: int) -> bytes:
    """`value` as a varint of exactly `length` bytes (redundant continuation bytes if needed)."""
    out = bytearray()
    for i in range(length):
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if i < length - 1 else 0))
    if value:
        raise ValueError("value does not fit")
    return bytes(out)


def _aligned_framing(name: str, slot: str, dtype: str, shape: tuple, total: int, at: int) -> bytes:
    """`_framing` of a whole dense tensor whose entry starts at byte `at` of the message, with
    its varints padded so that the data starts at a multiple of ALIGN (unpadded if impossible)."""
    meta = _meta(name, slot, dtype, shape, 0, total, False, b"")
    tag_e, tag_d = _TENSORS_FIELD << 3 | _LEN, _DATA_FIELD << 3 | _LEN
    best = None
    for d_len in range(len(_varint(total)), _MAX_VARINT32 + 1):
        for d_tag in range(1, _MAX_VARINT32 + 1):
            entry = len(meta) + d_tag + d_len + total
            for e_len in range(len(_varint(entry)), _MAX_VARINT32 + 1):
                for e_tag in range(1, _MAX_VARINT32 + 1):
                    extra = e_tag + e_len + d_tag + d_len
                    if (at + extra + len(meta)) % ALIGN == 0 and (best is None or extra < best[0]):
                        best = (extra, e_tag, e_len, d_tag, d_len, entry)
    if best is None or total >= 1 << 31:
        return _framing(name, slot, dtype, shape, 0, total, False, b"", total)
    _, e_tag, e_len, d_tag, d_len, entry = best
    return (_varint_n(tag_e, e_tag) + _varint_n(entry, e_len) + meta + _varint_n(tag_d, d_tag)
            + _varint_n(total, d_len))


def _meta(name: str, slot: str, dtype: str, shape: tuple, offset: int, total: int, sparse: bool,
          rows: bytes) -> bytes:
    """A Tensor's fields other than ``data``, encoded (proto3: default values left out)."""
    meta = []
    if name:
        meta.append(_len_field(1, name.encode()))
    if dtype:
        meta.append(_len_field(2, dtype.encode()))
    if shape:
        meta.append(_len_field(3, b"".join(_varint(d) for d in shape)))
    for number, value in ((5, offset), (6, total), (7, int(sparse))):
        if value:
            meta.append(_varint(number << 3 | _VARINT) + _varint(value))
    if rows:
        meta.append(_len_field(8, rows))
    if slot:
        meta.append(_len_field(9, slot.encode()))
    return b"".join(meta)


ONE_MESSAGE = 1 << 62  # a chunk size that puts every tensor, whole, into one message


def encode_message(tensors: Mapping[str, Any] | Iterable[tuple[str, str, Any]], header: bytes | None = None) -> bytes:
    """One serialized stream message carrying all `tensors` unchunked (the unary ``...One``
    methods); parse it with `Assembler.add_wire` like any stream message."""
    return next(iter(encode_wire(tensors, header, ONE_MESSAGE)))


class _WirePiece:
    """The fields of one Tensor read from wire bytes; `data` and `rows` are memoryviews."""

    __slots__ = ("name", "dtype", "shape", "data", "offset", "total", "sparse", "rows", "slot", "data_at")

    def __init__(self):
        self.name = self.dtype = self.slot = ""
        self.shape: list[int] = []
        self.data = self.rows = memoryview(b"")
        self.offset = self.total = 0
        self.sparse = False
        self.data_at = -1  # where the data field's bytes start in the message


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise CodecError("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, stop)) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield field_number, wire_type, value
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise CodecError("malformed message: a field runs past the end of the message")
            yield field_number, wire_type, (pos, pos + length)
            pos += length
        elif wire_type in (1, 5):  # fixed64 / fixed32: not used by Tensor, skipped
            pos += 8 if wire_type == 1 else 4
        else:
            raise CodecError(f"malformed message: unsupported wire type {wire_type}")


def _packed_varints(buf, start: int, stop: int) -> list[int]:
    out = []
    while start < stop:
        v, start = _read_varint(buf, start, stop)
        out.append(_signed(v))
    return out


def _text(view: memoryview, a: int, b: int, what: str) -> str:
    try:
        return str(view[a:b], "utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"malformed message: tensor {what} is not valid UTF-8") from None


def _parse_tensor(view: memoryview, start: int, stop: int) -> _WirePiece:
    piece = _WirePiece()
    for number, wire_type, value in _fields(view, start, stop):
        if wire_type == _LEN:
            a, b = value
            if number == 1:
                piece.name = _text(view, a, b, "name")
            elif number == 2:
                piece.dtype = _text(view, a, b, "dtype")
            elif number == 3:
                piece.shape.extend(_packed_varints(view, a, b))
            elif number == 4:
                piece.data, piece.data_at = view[a:b], a
            elif number == 8:
                piece.rows = view[a:b]
            elif number == 9:
                piece.slot = _text(view, a, b, "slot")
        elif number == 3:
            piece.shape.append(_signed(value))
        elif number == 5:
            piece.offset = _signed(value)
        elif number == 6:
            piece.total = _signed(value)
        elif number == 7:
            piece.sparse = bool(value)
    return piece


def read_header(message: bytes) -> bytes | None:
    """The header bytes (field 1) of a serialized stream message, without parsing its tensors."""
    view = memoryview(message)
    for number, wire_type, value in _fields(view, 0, len(view)):
        if number == _HEADER_FIELD and wire_type == _LEN:
            return bytes(view[value[0] : value[1]])
    return None


def parse_header(cls, raw: bytes):
    """The header message `cls` from its bytes; CodecError when they are not one."""
    from google.protobuf.message import DecodeError

    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise CodecError(f"malformed message: the {cls.DESCRIPTOR.name} header does not parse ({exc})") from None


def _copied(value):
    """An owned copy of a decoded tensor (dense array or SparseRows)."""
    if isinstance(value, SparseRows):
        return value._replace(rows=np.array(value.rows), values=np.array(value.values))
    return np.array(value)


def _add_wire(self: Assembler, message: bytes) -> bytes | None:
    view = memoryview(message)
    header = None
    before, done_before = self.nbytes, len(self._done)  # tensors finished in this message: views of it
    for number, wire_type, value in _fields(view, 0, len(view)):
        if wire_type != _LEN:
            continue
        if number == _HEADER_FIELD:
            header = bytes(view[value[0] : value[1]])
        elif number == _TENSORS_FIELD:
            a, b = value
            known = _known_tensor(view, a, b)
            if known is not None and known[0] not in self._done and known[0] not in self._partial:
                key, dtype, shape, data_at = known
                if self._admit is not None:
                    self._admit(key[0], key[1], dtype, shape, False, b - data_at)
                self.nbytes += b - data_at
                self._done[key] = np.frombuffer(view[data_at:b], dtype=dtype).reshape(shape)
                continue
            piece = _parse_tensor(view, a, b)
            self._add_piece(piece)
            _remember_tensor(view, a, b, piece)
    if len(self._done) > done_before and len(view) > 2 * (self.nbytes - before) + OWNED_SLACK:
        # zero-copy views keep the whole message alive: a message mostly made of something else
        # (padding, unknown fields) must not outlive the tensor bytes a push's budget charged
        for key in list(self._done)[done_before:]:
            self._done[key] = _copied(self._done[key])
    return header


# Whole dense tensors seen before, by the length of their Tensor entry: (the entry's bytes up to
# the data, (name, slot), dtype, shape). A worker pushes, and a shard answers, the same tensors
# every step, and an entry's bytes other than the data are a pure function of what the generic
# parse returns, so an entry that starts with the same bytes and has the same length parses the
# same: the parse (about 20 us of Python per tensor) becomes one comparison of ~40 bytes.
_KNOWN: dict[int, list[tuple[bytes, tuple[str, str], np.dtype, tuple]]] = {}
_KNOWN_MAX = 1 << 12


def _known_tensor(view: memoryview, a: int, b: int):
    for meta, key, dtype, shape in _KNOWN.get(b - a, ()):
        if view[a : a + len(meta)] == meta:
            return key, dtype, shape, a + len(meta)
    return None


def _remember_tensor(view: memoryview, a: int, b: int, piece: _WirePiece) -> None:
    """Caches a whole dense tensor's entry (data last, as `encode_wire` writes it)."""
    if piece.sparse or piece.offset or piece.data_at < 0 or piece.data_at + len(piece.data) != b \
            or len(piece.data) != piece.total or piece.data_at - a > 512:
        return
    if sum(map(len, _KNOWN.values())) >= _KNOWN_MAX:
        _KNOWN.clear()
    dtype, shape, _ = _header(piece)  # (already validated by _add_piece)
    entry = (bytes(view[a : piece.data_at]), (piece.name, piece.slot), dtype, shape)
    bucket = _KNOWN.setdefault(b - a, [])
    if all(e[0] != entry[0] for e in bucket):
        bucket.append(entry)


# ----------------------------------------------------------------------------------------------
# Snapshots: a shard's whole state, as streamed by Snapshot and Restore


def encode_snapshot(snap: Snapshot, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized SnapshotChunk messages carrying `snap`."""
    from asyncps.protos import ps_pb2

    header = ps_pb2.SnapshotHeader(version=snap.version, optimizer=snap.optimizer, last_seq=snap.last_seq,
                                   clocks=snap.clocks, updates=snap.updates)
    items = [(n, "", v) for n, v in snap.values.items()]
    items += [(n, slot, v) for n, slots in snap.slots.items() for slot, v in slots.items()]
    return encode_wire(items, header.SerializeToString(), chunk_bytes)


def decode_snapshot(messages: Iterable[bytes]) -> Snapshot:
    """The Snapshot carried by serialized SnapshotChunk messages."""
    from asyncps.protos import ps_pb2

    asm, header = Assembler(), None
    for msg in messages:
        raw = asm.add_wire(msg)
        if header is None and raw is not None:
            header = parse_header(ps_pb2.SnapshotHeader, raw)
    if header is None:
        raise CodecError("snapshot stream has no header")
    return Snapshot(
        version=header.version,
        values={name: dense(v, f"value {name!r}") for name, v in asm.finish().items()},
        slots=asm.slots(),
        updates=dict(header.updates),
        last_seq=dict(header.last_seq),
        clocks=dict(header.clocks),
        optimizer=header.optimizer,
    )
