"""Embedding tables keyed by 64-bit ids: rows created on first touch, row-wise pull and push,
per-row slots, versions and staleness, bounded capacity with eviction.

A dense variable has a fixed shape; a table maps any 64-bit id (a hashed feature value) to a row
of `dim` floats, so the model can be far larger than what one step touches. This module is the
shard-side store, pure numpy like the rest of ps/: the transport sends ids and rows, the store
answers with rows and their versions and applies row gradients through the shard's optimizer
(`apply_sparse`, which updates only the given rows of the value and of every slot: Adagrad, FTRL,
lazy Adam keep per-row state that is created with the row).

- Deterministic rows: a new row's values are a pure function of (seed, table name, id, column)
  (a SplitMix64 hash mapped to uniform(-scale, scale)), so every shard, restart and replay makes
  the same row, whatever the order ids arrive in.
- Versions: each row counts the updates applied to it. A push carries, per row, the version the
  worker read; the row's staleness is its version when applied minus that. The histogram is kept
  per row-frequency bucket (log2 of the row's update count: hot rows vs cold rows), which no
  parameter server reports.
- Capacity (optional): at most `capacity` rows; a new row beyond it evicts the least recently used
  (`lru`) or least frequently updated (`lfu`) row, counted. An evicted id that comes back is a new
  row (deterministic initial values, fresh slots, version 0).
- Memory: a row costs its values and slots, 16 bytes of counters (version, id), 16 more with a
  capacity (last use and creation order, for eviction), and 6-12 bytes of id index (`IdIndex`: int32 rows in an
  open-addressing array, where a dict of Python ints cost about 110); storage grows by half.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asyncps.hashing import name_key, splitmix64
from asyncps.ps.errors import InvalidArgument

FREQUENCY_BUCKETS = 16  # row-frequency buckets: updates in [2^k, 2^(k+1)), the last open-ended
GROWTH = 1.5  # storage grows by half when full: at most a third of it reserved, not half as by doubling


def initial_rows(seed: int, table: str, ids: np.ndarray, dim: int, scale: float) -> np.ndarray:
    """The first values of rows `ids`: uniform(-scale, scale), a pure function of (seed, table,
    id, column). float32, shape (len(ids), dim)."""
    with np.errstate(over="ignore"):
        x = splitmix64(ids.astype(np.uint64)[:, None] ^ name_key(table, seed))
        x = splitmix64(x + np.arange(dim, dtype=np.uint64)[None, :])
    unit = (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # [0, 1) from the top 53 bits
    return ((2.0 * unit - 1.0) * scale).astype(np.float32)


def frequency_bucket(updates: np.ndarray) -> np.ndarray:
    """Bucket k holds rows with 2^k <= updates < 2^(k+1) (bucket 0: 0 or 1 update so far)."""
    return np.minimum(np.floor(np.log2(np.maximum(updates, 1))).astype(np.int64), FREQUENCY_BUCKETS - 1)


class IdIndex:
    """id -> storage row of one table: open addressing with linear probing over a power-of-two
    array of int32 rows, every operation vectorized over a batch of ids.

    A slot holds a row, not an id: it matches id i when the table's `keys` array (its `ids`,
    passed in by each call because storage growth replaces it) holds i at that row. So the
    index costs 4 bytes a slot, 6-12 bytes a row at load 0.35-0.7, where a dict of Python ints
    cost about 110. An evicted id leaves a DELETED slot (probing goes on past it; an insert may
    reuse it); a rebuild at twice the size drops them once live + deleted pass MAX_LOAD.
    """

    EMPTY, DELETED = -1, -2
    MAX_LOAD = 0.7
    _SALT = np.uint64(0x5851F42D4C957F2D)  # not table_owners' salt: ids of one shard still spread evenly

    def __init__(self, reserve: int = 1024):
        self.slots = np.full(self._size_for(reserve), self.EMPTY, np.int32)
        self.live = 0
        self.deleted = 0

    def __len__(self) -> int:
        return self.live

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    @classmethod
    def _size_for(cls, rows: int) -> int:
        return 1 << max(4, int(np.ceil(np.log2(max(rows, 1) / cls.MAX_LOAD))))

    def _home(self, ids: np.ndarray) -> np.ndarray:
        bits = len(self.slots).bit_length() - 1
        h = splitmix64(np.asarray(ids, np.int64).astype(np.uint64) ^ self._SALT)
        return (h >> np.uint64(64 - bits)).astype(np.int64)  # the top bits: the best mixed

    def _probe(self, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, row) of each id: its row and slot, or row -1 and the EMPTY slot that ends its
        probe sequence."""
        mask = len(self.slots) - 1
        rows = np.full(len(ids), -1, np.int64)
        where = np.empty(len(ids), np.int64)
        pending, pos = np.arange(len(ids)), self._home(ids)
        while len(pending):
            r = self.slots[pos]
            hit = r >= 0
            hit[hit] = keys[r[hit]] == ids[pending[hit]]
            done = hit | (r == self.EMPTY)
            rows[pending[hit]] = r[hit]
            where[pending[done]] = pos[done]
            pending, pos = pending[~done], (pos[~done] + 1) & mask
        return where, rows

    def find(self, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The row of each id (int64), -1 where it has none."""
        return self._probe(np.asarray(ids, np.int64), keys)[1]

    def insert(self, ids: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> None:
        """Adds ids (unique, none indexed yet) at rows; `keys[rows]` must already hold them."""
        ids = np.asarray(ids, np.int64)
        if self.live + self.deleted + len(ids) > self.MAX_LOAD * len(self.slots):
            self._rebuild(self.live + len(ids), keys)
        mask = len(self.slots) - 1
        pending, pos = np.arange(len(ids)), self._home(ids)
        while len(pending):
            free = self.slots[pos] < 0
            # several ids may probe the same free slot: the first of them takes it, the rest go on
            _, first = np.unique(pos[free], return_index=True)
            take = np.flatnonzero(free)[first]
            self.deleted -= int((self.slots[pos[take]] == self.DELETED).sum())
            self.slots[pos[take]] = rows[pending[take]]
            left = np.ones(len(pending), bool)
            left[take] = False
            pending, pos = pending[left], (pos[left] + 1) & mask
        self.live += len(ids)

    def delete(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Drops ids (each indexed) from the index; call before `keys` changes at their rows."""
        where, rows = self._probe(np.asarray(ids, np.int64), keys)
        assert (rows >= 0).all(), "IdIndex.delete of an id it does not hold"
        self.slots[where] = self.DELETED
        self.live -= len(where)
        self.deleted += len(where)

    def _rebuild(self, rows_needed: int, keys: np.ndarray) -> None:
        live = self.slots[self.slots >= 0].astype(np.int64)
        self.slots = np.full(self._size_for(2 * rows_needed), self.EMPTY, np.int32)
        self.live = self.deleted = 0
        if len(live):
            self.insert(keys[live], live, keys)

    def rows(self) -> np.ndarray:
        """Every indexed row (int64), in slot order."""
        return self.slots[self.slots >= 0].astype(np.int64)


class EmbeddingTable:
    """One table's rows on one shard (see the module docstring). Not thread-safe: the shard's
    lock guards it, like every other variable."""

    def __init__(self, name: str, dim: int, seed: int, optimizer, init_scale: float = 0.05,
                 capacity: int | None = None, eviction: str = "lru", initial_rows_reserved: int = 1024):
        if dim < 1:
            raise InvalidArgument(f"table {name!r}: dim must be at least 1, got {dim}")
        if eviction not in ("lru", "lfu"):
            raise InvalidArgument(f"table {name!r}: eviction must be lru or lfu, got {eviction!r}")
        self.name, self.dim, self.seed, self.scale = name, dim, seed, float(init_scale)
        self.optimizer = optimizer
        self.capacity, self.eviction = capacity, eviction
        n = max(1, min(initial_rows_reserved, capacity or initial_rows_reserved))
        self.values = np.zeros((n, dim), np.float32)
        self.slots: dict[str, np.ndarray] = optimizer.init_slots(self.values)
        self._slot0 = {k: v[0].copy() for k, v in optimizer.init_slots(np.zeros((1, dim), np.float32)).items()}
        self.versions = np.zeros(n, np.int64)  # updates applied to each row
        # tick of the last pull or push touching the row: only eviction reads it, so only a table
        # with a capacity keeps it (8 bytes a row)
        self.last_used = np.zeros(n if capacity is not None else 0, np.int64)
        self.born = np.zeros(n if capacity is not None else 0, np.int64)  # creation order: eviction's tie-break
        self.ids = np.zeros(n, np.int64)  # the id each row of storage holds
        self.index = IdIndex(n)  # id -> row of storage
        self.free: list[int] = []
        self.size = 0  # rows of storage used (live or freed)
        self.tick = 0
        self.updates = 0  # pushes applied to the table (the optimizer's step)
        self.evicted = 0
        self.created = 0
        self.rewound = 0  # pushed rows read at a version ahead of the row (evicted or restored since)
        self.staleness = np.zeros((FREQUENCY_BUCKETS, 64), np.int64)  # [frequency bucket, staleness]

    @property
    def rows(self) -> int:
        """Live rows."""
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """Bytes the table holds: its arrays (values, slots, versions, ids; last use and creation
        order where a capacity needs them; reserved rows included, storage grows by half) and its
        id index's array. Exact: every byte is in a numpy array."""
        arrays = self.values.nbytes + sum(s.nbytes for s in self.slots.values())
        arrays += self.versions.nbytes + self.last_used.nbytes + self.born.nbytes + self.ids.nbytes
        return arrays + self.index.nbytes

    # -- rows -----------------------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        n = len(self.values)
        if need <= n:
            return
        new = max(need, int(GROWTH * n) + 1)
        if self.capacity is not None:
            new = min(new, self.capacity)

        def widen(a, fill=0):
            out = np.full((new,) + a.shape[1:], fill, a.dtype)
            out[:n] = a
            return out

        self.values = widen(self.values)
        self.slots = {k: widen(v) for k, v in self.slots.items()}
        self.versions, self.ids = widen(self.versions), widen(self.ids)
        if self.capacity is not None:
            self.last_used, self.born = widen(self.last_used), widen(self.born)

    def _victim(self, protected: set[int]) -> int:
        """The storage row to evict: least recently used or least frequently updated (ties: the
        older), never one of the rows the current call needs."""
        live = self._live_rows()
        live = live[~np.isin(live, np.fromiter(protected, np.int64, len(protected)))]
        if not len(live):
            raise InvalidArgument(f"table {self.name!r}: one call touches more ids than its capacity "
                                  f"({self.capacity})")
        if self.eviction == "lfu":
            order = np.lexsort((self.born[live], self.last_used[live], self.versions[live]))
        else:
            order = np.lexsort((self.born[live], self.last_used[live]))
        return int(live[order[0]])

    def _live_rows(self) -> np.ndarray:
        """Storage rows holding a row (int64, ascending): all used storage but given-back rows."""
        live = np.arange(self.size)
        if self.free:  # none today: an evicted row is reused at once
            live = live[~np.isin(live, np.asarray(self.free, np.int64))]
        return live

    def lookup(self, ids: np.ndarray, create: bool = True) -> np.ndarray:
        """Storage rows of `ids` (int64, any order, duplicates allowed), creating missing rows."""
        ids = np.asarray(ids, dtype=np.int64)
        self.tick += 1
        out = self.index.find(ids, self.ids)
        missing = np.flatnonzero(out < 0)
        if len(missing):
            if not create:
                raise InvalidArgument(f"table {self.name!r}: {len(missing)} ids have no row")
            self._create(ids, missing, out)
        if self.capacity is not None:
            self.last_used[out] = self.tick
        return out

    def _create(self, ids: np.ndarray, missing: np.ndarray, out: np.ndarray) -> None:
        new_ids, first, inverse = np.unique(ids[missing], return_index=True, return_inverse=True)
        if self.capacity is not None:  # refused before anything changes
            known = np.ones(len(ids), bool)
            known[missing] = False
            if len(np.unique(out[known])) + len(new_ids) > self.capacity:
                raise InvalidArgument(f"table {self.name!r}: one call touches more ids than its capacity "
                                      f"({self.capacity})")
        order = np.argsort(first, kind="stable")  # rows in order of arrival, as ids come in
        made = np.empty(len(new_ids), np.int64)  # storage row of new_ids[k]
        taken = 0
        while taken < len(order) and self.free:  # storage given back first (none today)
            made[order[taken]] = self.free.pop()
            taken += 1
        room = len(order) - taken
        if self.capacity is not None:
            room = min(room, max(0, self.capacity - self.size))
        if room:
            self._grow(self.size + room)
            made[order[taken:taken + room]] = np.arange(self.size, self.size + room)
            self.size += room
            taken += room
        if taken < len(order):  # full (so a capacity, and `known`): evict one row at a time, never one this call needs
            protected = set(out[known].tolist()) | set(made[order[:taken]].tolist())
            for k in order[taken:]:
                r = self._victim(protected)
                self.index.delete(self.ids[r:r + 1], self.ids)
                self.evicted += 1
                made[k] = r
                protected.add(r)
        self.ids[made] = new_ids
        self.index.insert(new_ids, made, self.ids)
        self.values[made] = initial_rows(self.seed, self.name, new_ids, self.dim, self.scale)
        for name, slot in self.slots.items():
            slot[made] = self._slot0[name]
        self.versions[made] = 0
        if self.capacity is not None:
            self.born[made[order]] = self.created + np.arange(len(order))
        self.created += len(made)
        out[missing] = made[inverse.reshape(-1)]

    # -- pull and push ----------------------------------------------------------------------------

    def pull(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(copies of the rows of `ids`, their versions), rows created on first touch."""
        rows = self.lookup(ids)
        return self.values[rows].copy(), self.versions[rows].copy()

    def peek(self, ids: np.ndarray) -> np.ndarray:
        """The rows of `ids` as they are, or would be when created: nothing is created or touched
        (evaluation on ids training never saw)."""
        return self.peek_with_versions(ids)[0]

    def peek_with_versions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`peek`, and the rows' versions (0 for a row not made yet): one pass over the ids."""
        ids = np.asarray(ids, dtype=np.int64)
        out = initial_rows(self.seed, self.name, ids, self.dim, self.scale)
        versions = np.zeros(len(ids), np.int64)
        rows = self.index.find(ids, self.ids)
        known = rows >= 0
        if known.any():
            out[known] = self.values[rows[known]]
            versions[known] = self.versions[rows[known]]
        return out, versions

    def hottest(self, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(ids, update counts) of the `k` most updated live rows, hottest first (ties: the
        smaller id first)."""
        rows = self._live_rows()
        if not len(rows):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(rows) > k:  # the k largest in O(rows), then sorted; ties at the k-th: the smaller ids
            kth = -np.partition(-self.versions[rows], k - 1)[k - 1]
            rows = rows[self.versions[rows] >= kth]
        top = rows[np.lexsort((self.ids[rows], -self.versions[rows]))[:k]]
        return self.ids[top].copy(), self.versions[top].copy()

    def push(self, ids: np.ndarray, grads: np.ndarray, read_versions: np.ndarray, lr: float) -> np.ndarray:
        """Applies row gradients (duplicate ids are summed first); returns each unique id's
        staleness (its version now minus the version read), recorded per frequency bucket."""
        ids = np.asarray(ids, dtype=np.int64)
        grads = np.asarray(grads, dtype=np.float32)
        read_versions = np.asarray(read_versions, dtype=np.int64)
        if grads.shape != (len(ids), self.dim) or read_versions.shape != (len(ids),):
            raise InvalidArgument(f"table {self.name!r}: {len(ids)} ids need gradients of shape "
                                  f"({len(ids)}, {self.dim}) and as many read versions, got {grads.shape} "
                                  f"and {read_versions.shape}")
        if not np.isfinite(grads).all():
            raise InvalidArgument(f"table {self.name!r}: non-finite gradient values (NaN or Inf)")
        unique, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(unique), self.dim), np.float32)
        np.add.at(summed, inverse, grads)
        read = np.zeros(len(unique), np.int64)
        np.maximum.at(read, inverse, read_versions)  # a duplicated id: the newest read of it
        rows = self.lookup(unique)
        staleness = self.versions[rows] - read
        # A read version ahead of its row: the row was evicted and made again, or the shard was
        # restored from a checkpoint, since the worker read it. The updates the worker missed
        # are unknowable then: counted as staleness 0, and the row as `rewound`.
        behind = staleness < 0
        if behind.any():
            self.rewound += int(behind.sum())
            staleness = np.maximum(staleness, 0)
        np.add.at(self.staleness, (frequency_bucket(self.versions[rows]), np.minimum(staleness, 63)), 1)
        self.optimizer.apply_sparse(self.values, rows, summed, self.slots, lr, self.updates)
        self.versions[rows] += 1
        self.updates += 1
        return staleness

    # -- checkpoints ------------------------------------------------------------------------------

    def chunk(self, start: int, rows: int) -> tuple[int, dict | None]:
        """Copies of the live rows among storage rows [start, start + rows): (next start, {"ids",
        "versions", "values", "slots": {name: rows}}), None once past the end. Bounded memory:
        a checkpoint reads a table one chunk at a time (the caller holds the shard's lock for
        each chunk only)."""
        if start >= self.size:
            return start, None
        stop = min(self.size, start + rows)
        live = np.arange(start, stop)
        if self.free:  # storage rows given back (none today: an evicted row is reused at once)
            live = live[~np.isin(live, np.asarray(self.free, np.int64))]
        return stop, {"ids": self.ids[live].copy(), "versions": self.versions[live].copy(),
                      "values": self.values[live].copy(), "slots": {k: v[live].copy() for k, v in self.slots.items()}}

    def load(self, ids: np.ndarray, versions: np.ndarray, values: np.ndarray, slots: Mapping[str, np.ndarray]) -> None:
        """Puts saved rows in (a restore): values, versions and slots as given, made if missing."""
        if set(slots) != set(self.slots):
            raise InvalidArgument(f"table {self.name!r}: saved slots {sorted(slots)}, the optimizer keeps "
                                  f"{sorted(self.slots)}")
        step = len(ids) if self.capacity is None else max(1, self.capacity // 2)  # a lookup must fit the capacity
        for a in range(0, len(ids), max(step, 1)):
            rows = self.lookup(ids[a:a + step])
            self.values[rows], self.versions[rows] = values[a:a + step], versions[a:a + step]
            for name, saved in slots.items():
                self.slots[name][rows] = saved[a:a + step]

    def stats(self) -> Mapping:
        """Rows, bytes, creations, evictions and the staleness histogram by frequency bucket."""
        by_bucket = {int(b): {int(s): int(c) for s, c in enumerate(row) if c}
                     for b, row in enumerate(self.staleness) if row.any()}
        return {"rows": self.rows, "bytes": self.nbytes, "created": self.created, "evicted": self.evicted,
                "updates": self.updates, "rewound": self.rewound, "staleness_by_frequency": by_bucket}
