"""The protobuf-object codec: the test oracle for the hand-written wire codec.

The library speaks one data-plane shape, serialized stream messages written by
`codec.encode_wire` and parsed by `codec.Assembler.add_wire`, without protobuf objects for the
tensor data. This module builds and reads the same messages through the generated classes
(``msg.tensors.add(...)``, ``piece.data``), the slow and obviously-standard way, so the tests can
check that the fast codec produces and accepts exactly what protobuf does, and can feed the
assembler single malformed `Tensor` pieces.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from asyncps.protos import codec
from asyncps.protos.codec import CHUNK_BYTES, Assembler, SparseRows


def encode_stream(
    tensors: Mapping[str, Any] | Iterable[tuple[str, str, Any]],
    new_message: Callable[[], Any],
    chunk_bytes: int = CHUNK_BYTES,
    first: Any = None,
) -> Iterator[Any]:
    """Messages (from `new_message()`, each with a ``tensors`` field) carrying all `tensors`.

    `tensors` maps names to arrays or SparseRows, or is an iterable of (name, slot, value).
    Each message carries about `chunk_bytes` of data; at least one message is yielded. `first`,
    when given, is used as the first message (a message with its header already set). Same
    layout and chunking as `codec.encode_wire`.
    """
    msg, used = (new_message() if first is None else first), 0
    for name, slot, value in codec._items(tensors):
        array, rows, sparse = codec._pieces(value)
        data = array.data.cast("B") if array.size else memoryview(b"")
        total, offset = len(data), 0
        while True:
            room = chunk_bytes - used
            if used and (room < min(codec._MIN_PIECE, total - offset) or room <= 0):
                yield msg
                msg, used = new_message(), 0
                room = chunk_bytes
            n = min(room, total - offset)
            piece = msg.tensors.add(name=name, dtype=codec._WIRE_NAMES[array.dtype], offset=offset, total=total)
            piece.shape.extend(array.shape)
            piece.data = bytes(data[offset : offset + n])
            if sparse:
                piece.sparse = True
                if offset == 0:
                    piece.rows = rows
            if slot:
                piece.slot = slot
            used += max(n, 1)
            offset += n
            if offset >= total:
                break
    yield msg


def add(asm: Assembler, pieces: Iterable[Any]) -> None:
    """Feeds the `Tensor` objects of one message to `asm`, in order: the same checks
    `add_wire` applies to the pieces it parses."""
    for piece in pieces:
        asm._add_piece(piece)


def decode_stream(messages: Iterable[Any]) -> dict[str, np.ndarray | SparseRows]:
    """All tensors of an iterable of messages with a ``tensors`` field."""
    asm = Assembler()
    for msg in messages:
        add(asm, msg.tensors)
    return asm.finish()
