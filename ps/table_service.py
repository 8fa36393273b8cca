"""The id-keyed embedding tables of one shard, beside its dense core (ps/shard.py).

A shard may hold its hash-placed part of embedding tables declared at Init (ps/tables.py, the
store of one table; docs/sparse.md). This object is everything the shard does with them:
- the specs ({name: dim}) an Init declares, checked against the variables, the consistency mode
  and the staleness settings: tables need async or ssp (a sync round would average rows of
  different reads), no controlled staleness and no staleness policy other than none (they act
  on whole variables);
- the rows a pull asks for: a worker's read makes missing rows (first touch), the chief's
  (worker None) makes none; each row with its version;
- the row gradients of a push (`TableGrad`, protos/table_rows.py): validated before the lock,
  applied in the same update as the dense gradients at the same learning rate, through the
  optimizer's row-wise update; each row counts its own updates and the table records per-row
  staleness;
- capacity and eviction (per table on this shard, ps/tables.py);
- checkpoints: a table read chunk by chunk (a checkpoint of bounded memory), a restored table
  built from saved chunks and staged until the shard's next `restore` installs it (a table not
  staged starts empty);
- stats per table, with the hottest ids on request.

Not thread-safe on its own, like the observers and views: the shard calls it with its lock held.
It takes that lock itself only where it works outside a shard call: between the chunks of a
table being read, and to stage a restored table it built without the lock.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from asyncps.partition import table_owners
from asyncps.protos.table_rows import TableGrad
from asyncps.ps import validate
from asyncps.ps.errors import FailedPrecondition, InvalidArgument, NotFound
from asyncps.ps.shard_settings import ShardSettings
from asyncps.ps.tables import EmbeddingTable
from asyncps.ps.update_rule import UpdateRule

MAX_DIM = 1 << 16  # a row's floats: what a table's spec may declare


class TableService:
    """The id-keyed tables of shard `index` (see the module docstring). `rule` gives the
    optimizer the rows are updated with; `lock` is the shard's."""

    def __init__(self, settings: ShardSettings, index: int, rule: UpdateRule, lock: threading.Condition):
        self.index = index
        self._settings = settings
        self._rule = rule
        self._lock = lock
        self._tables: dict[str, EmbeddingTable] = {}
        self._staged: dict[str, EmbeddingTable] = {}  # tables restored by RestoreTable, installed by `restored`

    @property
    def tables(self) -> Mapping[str, EmbeddingTable]:
        """The tables by name (fixed once initialized: a restore swaps in a new dict)."""
        return self._tables

    def specs(self) -> dict[str, int]:
        """{table name: dim}."""
        return {name: t.dim for name, t in self._tables.items()}

    # -- Init ---------------------------------------------------------------------------------------

    def check_specs(self, tables: Mapping[str, int], values: Mapping, mode: str) -> None:
        """Tables need a name no variable has, a dim in range, and a mode, a policy and reads
        they make sense with (module docstring). No lock needed."""
        if not tables:
            return
        for name, dim in tables.items():
            if not name or name in values or not 1 <= int(dim) <= MAX_DIM:
                raise InvalidArgument(f"table {name!r}: a table needs a name no variable has and a dim in "
                                      f"[1, 65536], got dim {dim}")
        if mode not in ("async", "ssp"):
            raise InvalidArgument(f"id-keyed tables {sorted(tables)} need cluster.mode async or ssp, not {mode}")
        if self._settings.staleness_policy != "none" or self._settings.controlled:
            raise InvalidArgument(f"id-keyed tables {sorted(tables)} train without optimizer.staleness_policy "
                                  "and staleness.controlled (they act on whole variables)")

    def check_same(self, tables: Mapping[str, int]) -> None:
        """A second Init must declare the tables the shard holds."""
        if tables != self.specs():
            raise FailedPrecondition(f"Init declares tables {tables}, shard {self.index} holds {self.specs()}")

    def create(self, tables: Mapping[str, int]) -> None:
        """Makes the (empty) tables of an Init."""
        self._tables = self._new(tables)

    def _new(self, tables: Mapping[str, int]) -> dict[str, EmbeddingTable]:
        s = self._settings
        return {name: EmbeddingTable(name, int(dim), s.seed, self._rule.optimizer, capacity=s.table_capacity,
                                     eviction=s.table_eviction)
                for name, dim in sorted(tables.items())}

    # -- pull and push --------------------------------------------------------------------------------

    def check_names(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._tables:
                raise NotFound(f"table {name!r} is not held by shard {self.index} (tables: {sorted(self._tables)})")

    def read_rows(self, worker: int | None, tables: Mapping[str, np.ndarray]) -> dict:
        """{table: (ids, rows, versions)} copies; a worker's read makes missing rows, the
        chief's (`worker` None) makes none."""
        out = {}
        for name, ids in tables.items():
            table = self._tables[name]
            if worker is None:
                out[name] = (ids, *table.peek_with_versions(ids))
            else:
                rows, versions = table.pull(ids)
                out[name] = (ids, rows, versions)
        return out

    def check_grads(self, grads: Mapping) -> dict:
        """The validated `TableGrad`s among a push's gradients (no lock needed: the tables'
        names and dims are fixed)."""
        return validate.check_table_grads({n: g for n, g in grads.items() if isinstance(g, TableGrad)},
                                          self._tables)

    def push(self, name: str, grad: TableGrad, lr: float) -> None:
        """Applies one checked row gradient (a known table, shapes, finite)."""
        self._tables[name].push(grad.ids, grad.values, grad.read_versions, lr)

    # -- checkpoints ----------------------------------------------------------------------------------

    def chunks(self, name: str, rows: int) -> tuple[int, Iterator[dict]]:
        """(updates, chunks): the table's update count and an iterator of its live rows in
        chunks of at most `rows` (ps/tables.py `chunk`), each copied under the lock. Call with
        the lock held; the iterator takes it for each chunk."""
        self.check_names([name])
        table = self._tables[name]

        def chunks():
            start = 0
            while True:
                with self._lock:
                    if self._tables.get(name) is not table:
                        raise FailedPrecondition(f"shard {self.index}: table {name!r} was restored while being read")
                    start, chunk = table.chunk(start, max(1, rows))
                if chunk is None:
                    return
                if len(chunk["ids"]):
                    yield chunk

        return table.updates, chunks()

    def stage(self, name: str, dim: int, updates: int, chunks: Iterable[Mapping]) -> int:
        """Builds table `name` from saved chunks ({"ids", "versions", "values", "slots"}),
        without the lock, and keeps it for the next `restored`; returns its rows. Rows another
        shard owns by hash, or that disagree with `dim`, are refused (InvalidArgument) and
        nothing is staged."""
        num_shards = self._settings.ps
        table = self._new({name: dim})[name]
        table.updates = int(updates)
        for c in chunks:
            ids = np.asarray(c["ids"], dtype=np.int64)
            n = len(ids)
            if c["values"].shape != (n, dim) or c["versions"].shape != (n,) or (n and c["versions"].min() < 0) \
                    or any(v.shape != (n, dim) for v in c["slots"].values()):
                raise InvalidArgument(f"table {name!r}: a restored chunk of {n} rows does not have rows of dim {dim}")
            if n and (table_owners(ids, num_shards) != self.index).any():
                raise InvalidArgument(f"table {name!r}: restored rows that shard {self.index} of {num_shards} "
                                      "does not own by hash")
            validate.check_finite(name, c["values"])
            table.load(ids, c["versions"], c["values"], c["slots"])
        with self._lock:
            self._staged[name] = table
        return table.rows

    def restored(self) -> None:
        """The shard was restored: the staged tables go in, a table not staged starts empty."""
        staged, self._staged = self._staged, {}
        self._tables = {**self._new(self.specs()), **staged}

    # -- stats ------------------------------------------------------------------------------------------

    def stats(self, hot_ids: bool = False) -> list[dict]:
        """Each table's counters, shaped like the TableStats message."""
        return [table_stats(t, hot_ids) for t in self._tables.values()]


def table_stats(table: EmbeddingTable, hot: bool = False) -> dict:
    """One table's counters, shaped like the TableStats message (`hot`: with the 10 hottest ids)."""
    hot_ids, hot_updates = table.hottest(10) if hot else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    buckets = [{"bucket": b, "histogram": np.trim_zeros(row, "b").tolist()}
               for b, row in enumerate(table.staleness) if row.any()]
    return {"name": table.name, "rows": table.rows, "bytes": table.nbytes, "created": table.created,
            "evicted": table.evicted, "updates": table.updates, "staleness": buckets,
            "hot_ids": hot_ids.tolist(), "hot_updates": hot_updates.tolist()}
