"""Rows of id-keyed tables on the wire: the `TableRows` message of ps.proto, to and from numpy.

Table rows ride in the HEADER of a push, a pull request and a pull reply (PushHeader.table_grads
and .table_pull, PullRequest.tables, PullHeader.tables), not as Tensor pieces: a step moves the
rows of its batch's unique ids (tens of KiB), their count changes every step, and the header is
the one part every transport carries as is (gRPC streams and unary calls, and the control
message of the shared-memory transport). Each array is raw little-endian bytes, decoded with
`np.frombuffer` (one copy at most); a message whose counts and byte lengths disagree is refused
here with a CodecError (INVALID_ARGUMENT) naming the table, before any shard state is touched.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from asyncps.protos import ps_pb2
from asyncps.protos.codec import CodecError


class TableGrad(NamedTuple):
    """A push's part for one table: unique ids, summed row gradients (n, dim) float32, and the
    version of each row the worker read."""

    ids: np.ndarray
    values: np.ndarray
    read_versions: np.ndarray


def _bytes(a: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def ids_message(table: str, ids: np.ndarray) -> ps_pb2.TableRows:
    """A request for the rows of `ids`."""
    return ps_pb2.TableRows(table=table, ids=_bytes(ids, "<i8"))


def rows_message(table: str, ids: np.ndarray, values: np.ndarray, versions: np.ndarray) -> ps_pb2.TableRows:
    """Rows with their versions (a pull reply) or row gradients with the versions read (a push)."""
    return ps_pb2.TableRows(table=table, ids=_bytes(ids, "<i8"), versions=_bytes(versions, "<i8"),
                            values=_bytes(values, "<f4"))


def read_ids(message: ps_pb2.TableRows) -> np.ndarray:
    """The int64 ids of a message (a read-only view of its bytes)."""
    if len(message.ids) % 8:
        raise CodecError(f"table {message.table!r}: {len(message.ids)} bytes of ids are not whole int64s")
    return np.frombuffer(message.ids, dtype="<i8")


def read_rows(message: ps_pb2.TableRows, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values (n, dim) float32, versions) of a message; counts and bytes must agree."""
    ids = read_ids(message)
    n = len(ids)
    if len(message.versions) != 8 * n or len(message.values) != 4 * n * dim:
        raise CodecError(f"table {message.table!r}: {n} ids need {8 * n} bytes of versions and {4 * n * dim} bytes "
                         f"of values (dim {dim}), got {len(message.versions)} and {len(message.values)}")
    values = np.frombuffer(message.values, dtype="<f4").reshape(n, dim)
    return ids, values, np.frombuffer(message.versions, dtype="<i8")


def nbytes(messages) -> int:
    """Bytes of table rows in `messages` (ids, versions and values)."""
    return sum(len(m.ids) + len(m.versions) + len(m.values) for m in messages)


def chunk_message(name: str, dim: int, updates: int, chunk: dict | None, first: bool) -> ps_pb2.TableChunk:
    """One TableChunk (SnapshotTable): the spec in the first; rows, versions and slots."""
    message = ps_pb2.TableChunk()
    if first:
        message.spec.name, message.spec.dim, message.updates = name, dim, updates
    if chunk is not None:
        message.rows.CopyFrom(rows_message(name, chunk["ids"], chunk["values"], chunk["versions"]))
        for slot, values in sorted(chunk["slots"].items()):
            message.slots.add(name=slot, values=np.ascontiguousarray(values, dtype="<f4").tobytes())
    return message


def read_chunk(message: ps_pb2.TableChunk, dim: int) -> dict:
    """A TableChunk as {"ids", "versions", "values", "slots"}; counts and bytes must agree."""
    ids, values, versions = read_rows(message.rows, dim)
    slots = {}
    for slot in message.slots:
        if len(slot.values) != 4 * len(ids) * dim or slot.name in slots:
            raise CodecError(f"table {message.rows.table!r}: slot {slot.name!r} of {len(slot.values)} bytes for "
                             f"{len(ids)} rows of dim {dim} (or named twice)")
        slots[slot.name] = np.frombuffer(slot.values, dtype="<f4").reshape(len(ids), dim)
    return {"ids": ids, "versions": versions, "values": values, "slots": slots}
