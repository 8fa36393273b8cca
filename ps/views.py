"""Read views of a shard: which values a pull is served, and the values the shard keeps for it.

- `CurrentValues`: the live values (the default; no copy is kept).
- `PastVersions` (controlled staleness, ps/history.py): the values of `age` versions ago, from a
  bounded ring of the last `depth` versions, clamped to the oldest kept.
- `Milestones` (the chief's evaluations at exact multiples of `train.eval_every`): the values of
  those versions, kept until a later one is read, bounded in count and bytes.
- `ValuesRead` (DC-ASGD, whose update needs the value the worker computed on): per worker, a
  copy of what its last pull was served, looked up by the push's read version.

The views that keep values are observers (ps/observers.py): they must see every update and
every restore. All run under the shard's lock.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asyncps.ps.errors import NotFound
from asyncps.ps.history import VersionHistory
from asyncps.ps.observers import ShardObserver

# Evaluation milestones kept at once: as many as fit in MILESTONE_BYTES, at least MIN and at
# most MAX (a fast small model can pass several between two polls of the chief).
MIN_MILESTONES, MAX_MILESTONES, MILESTONE_BYTES = 4, 256, 64 << 20


def current_values(variables: Mapping, wanted: list[str]) -> dict[str, np.ndarray]:
    """The live arrays of `wanted` (the caller copies or encodes them under the lock)."""
    return {name: variables[name].value for name in wanted}


class PastVersions(ShardObserver):
    """Controlled staleness: the trainable values of the last `depth` versions."""

    def __init__(self, depth: int):
        self.history = VersionHistory(depth)

    @property
    def depth(self) -> int:
        return self.history.depth

    def read(self, version: int, variables: Mapping, wanted: list[str], age: int) -> tuple[int, dict]:
        """(version served, arrays) for a pull of `age` versions ago at current `version`."""
        served = self.history.resolve(version, age)
        kept = self.history.values(served) if served < version else {}
        return served, {name: kept[name] if name in kept else variables[name].value for name in wanted}

    def updating(self, version: int, variables: Mapping) -> None:
        if self.history.depth:  # keep this version before it changes (frozen ones never do)
            self.history.record(version, {n: v.value for n, v in variables.items() if not v.frozen})

    def restored(self, version: int) -> None:
        self.history.clear()  # the kept versions belong to the history before the restore


class Milestones(ShardObserver):
    """The values of every version that is a multiple of `every` (0: none), until read."""

    def __init__(self, every: int = 0):
        self.every = every
        self.kept: dict[int, dict[str, np.ndarray]] = {}  # version -> values, oldest first
        self.dropped = 0

    def updated(self, version: int, variables: Mapping) -> None:
        if not self.every or version % self.every:
            return
        self.kept[version] = {n: v.value.copy() for n, v in variables.items()}
        size = sum(v.value.nbytes for v in variables.values()) or 1
        while len(self.kept) > max(MIN_MILESTONES, min(MAX_MILESTONES, MILESTONE_BYTES // size)):
            del self.kept[next(iter(self.kept))]  # the chief fell behind: the oldest goes
            self.dropped += 1

    def read(self, shard: int, version: int, at_version: int, wanted: list[str]) -> dict[str, np.ndarray]:
        """The values of `at_version`; the older ones are dropped (read in order: done with)."""
        if at_version not in self.kept:
            raise NotFound(f"shard {shard}: version {at_version} is not kept (now {version}; kept: "
                           f"{sorted(self.kept)[:8]})")
        for older in [v for v in self.kept if v < at_version]:
            del self.kept[older]
        return {name: self.kept[at_version][name] for name in wanted}

    def restored(self, version: int) -> None:
        self.kept.clear()


class ValuesRead(ShardObserver):
    """DC-ASGD: worker -> (version, copies of the values its last pull was served)."""

    def __init__(self):
        self.reads: dict[int, tuple[int, dict]] = {}

    def remember(self, worker: int, version: int, values: dict) -> None:
        self.reads[worker] = (version, values)  # never written to afterwards (export only reads)

    def forget(self, worker: int) -> None:
        self.reads.pop(worker, None)

    def lookup(self, worker: int | None, read_version: int) -> dict:
        """What `worker` read at `read_version`; empty when not kept or not matching."""
        kept = self.reads.get(worker) if worker is not None else None
        return kept[1] if kept is not None and kept[0] == read_version else {}

    def restored(self, version: int) -> None:
        self.reads.clear()
