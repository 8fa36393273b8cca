"""Rows of id-keyed tables on the client's side: which shard owns which ids, and back.

Each id goes to (and comes from) the shard `partition.table_owners` names (a hash of the id,
common/partition.py `split_ids`); rows travel in the headers of pulls and pushes as TableRows
(protos/table_rows.py), on every transport. PSClient (common/ps_client.py) cuts a call's ids
and row gradients per shard with `split_ids`/`split_grads`, and puts the shards' answers back
in the caller's order with `join`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from asyncps.partition import split_ids
from asyncps.protos import codec, table_rows
from asyncps.protos.table_rows import TableGrad


class TableRouter:
    """The tables of one client ({name: dim}) over `num_shards` shards."""

    def __init__(self, tables: Mapping[str, int], num_shards: int):
        self.tables, self.num_shards = dict(tables), num_shards

    def nbytes(self, asked) -> int:
        """Bytes of the ids `asked` (TableRows, ids only) and of the rows answering them."""
        return sum(len(m.ids) // 8 * (8 + 8 + 8 + 4 * self.tables.get(m.table, 0)) for m in asked)

    def split_ids(self, table_ids: Mapping[str, Any] | None) -> tuple[list[list], dict]:
        """Per shard, the TableRows (ids only) it owns; and {table: per-shard positions}."""
        asked: list[list] = [[] for _ in range(self.num_shards)]
        positions = {}
        for name, ids in (table_ids or {}).items():
            self.dim(name)
            ids = np.asarray(ids, dtype=np.int64)
            positions[name] = split_ids(ids, self.num_shards)
            for i, pos in enumerate(positions[name]):
                if len(pos):
                    asked[i].append(table_rows.ids_message(name, ids[pos]))
        return asked, positions

    def split_grads(self, table_grads: Mapping[str, TableGrad] | None) -> list[list]:
        """Per shard, the TableRows (row gradients with the versions read) of the ids it owns."""
        out: list[list] = [[] for _ in range(self.num_shards)]
        for name, g in (table_grads or {}).items():
            self.dim(name)
            ids = np.asarray(g.ids, dtype=np.int64)
            for i, pos in enumerate(split_ids(ids, self.num_shards)):
                if len(pos):
                    out[i].append(table_rows.rows_message(name, ids[pos], np.asarray(g.values)[pos],
                                                          np.asarray(g.read_versions)[pos]))
        return out

    def dim(self, name: str) -> int:
        try:
            return self.tables[name]
        except KeyError:
            raise ValueError(f"table {name!r} is not one of this client's tables {sorted(self.tables)}") from None

    def join(self, table_ids, positions: dict, headers: list) -> dict:
        """{table: (rows, versions)} in the order of `table_ids`, from each shard's answer."""
        out = {}
        for name, ids in (table_ids or {}).items():
            dim = self.dim(name)
            rows = np.empty((len(ids), dim), np.float32)
            versions = np.empty(len(ids), np.int64)
            for i, pos in enumerate(positions[name]):
                if not len(pos):
                    continue
                got = [m for m in headers[i].tables if m.table == name]
                if len(got) != 1:
                    raise codec.CodecError(f"shard {i} answered {len(got)} row sets of table {name!r}, asked 1")
                got_ids, values, got_versions = table_rows.read_rows(got[0], dim)
                if not np.array_equal(got_ids, np.asarray(ids, dtype=np.int64)[pos]):
                    raise codec.CodecError(f"shard {i} answered other ids of table {name!r} than asked")
                rows[pos], versions[pos] = values, got_versions
            out[name] = (rows, versions)
        return out
