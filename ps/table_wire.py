"""The shard's side of table rows on the wire (protos/table_rows.py): decode what a request
asks for or pushes, encode what a pull answers. Shared by the gRPC servicer and the
shared-memory endpoint, which both carry rows in the header (docs/sparse.md)."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import numpy as np

from asyncps.protos import ps_pb2
from asyncps.protos.table_rows import TableGrad, chunk_message, ids_message, read_chunk, read_ids, read_rows, rows_message
from asyncps.ps.errors import InvalidArgument, NotFound

__all__ = ["TableGrad", "answer", "chunk_message", "ids_message", "pushed_rows", "read_chunk", "read_table_stream",
           "requested_ids"]


def _table(name: str, tables: Mapping):
    table = tables.get(name)
    if table is None:
        raise NotFound(f"table {name!r} is not held by this shard (tables: {sorted(tables)})")
    return table


def requested_ids(messages: Iterable[ps_pb2.TableRows], tables: Mapping) -> dict[str, np.ndarray]:
    """{table: ids} of a pull's TableRows (ids only)."""
    out: dict[str, np.ndarray] = {}
    for m in messages:
        _table(m.table, tables)
        if m.table in out:
            raise InvalidArgument(f"table {m.table!r} appears twice in one pull")
        out[m.table] = read_ids(m)
    return out


def pushed_rows(messages: Iterable[ps_pb2.TableRows], tables: Mapping) -> dict[str, TableGrad]:
    """{table: TableGrad} of a push's TableRows (counts and bytes checked; values checked by
    the shard's validation)."""
    out: dict[str, TableGrad] = {}
    for m in messages:
        table = _table(m.table, tables)
        if m.table in out:
            raise InvalidArgument(f"table {m.table!r} appears twice in one push")
        ids, values, versions = read_rows(m, table.dim)
        out[m.table] = TableGrad(ids, values, versions)
    return out


def answer(rows: Mapping[str, tuple] | None) -> list[ps_pb2.TableRows]:
    """The TableRows of a pull's answer ({table: (ids, rows, versions)})."""
    return [rows_message(name, ids, values, versions) for name, (ids, values, versions) in (rows or {}).items()]


def read_table_stream(messages, tables: Mapping, stage) -> tuple[str, int, int]:
    """Reads a RestoreTable stream, handing its chunks to ``stage(name, dim, updates, chunks)``
    as they arrive (one chunk in memory at a time); (name, dim, updates)."""
    it = iter(messages)
    first = next(it, None)
    if first is None or not first.HasField("spec") or not first.spec.name or first.spec.dim < 1:
        raise InvalidArgument("a table restore stream must start with the table's spec (name, dim >= 1)")
    name, dim = first.spec.name, int(first.spec.dim)
    if name in tables and tables[name].dim != dim:
        raise InvalidArgument(f"table {name!r}: restored rows of dim {dim}, the shard's table has dim {tables[name].dim}")

    def chunks():
        for m in itertools.chain([first], it):
            if not (m.HasField("rows") and len(m.rows.ids)):
                continue
            if m.rows.table != name:
                raise InvalidArgument(f"table restore of {name!r} carries rows of {m.rows.table!r}")
            yield read_chunk(m, dim)

    stage(name, dim, int(first.updates), chunks())
    return name, dim, int(first.updates)
