"""Controlled staleness on a shard: a bounded history of past versions, and pulls "r versions ago".

With ``staleness.controlled: true`` every worker draws, per gradient, a staleness r from the
configured distribution (`asyncps.worker.delays.StalenessSampler`, seeded exactly as in
``asyncps train``) and pulls with ``age = r``. The shard serves the values of version
``t - r``, where t is its version when the pull is served, from a ring of its last `depth`
versions (depth = the distribution's largest r, ``max_staleness``). All shards get the same r,
so a worker's read never mixes ages.

What "exactly r" means here: the gradient is computed on weights exactly r versions older than
the newest weights at the moment of the read. The staleness the shard records for the push is,
as always, (version when applied) - (version read) = r + k, where k is the number of pushes of
other workers applied while this worker computed. With one worker k = 0: the recorded staleness
is exactly r, and its histogram is the one ``asyncps train`` records for the same seed. With
several workers, `served_age_histogram` (r per applied push) follows the drawn distribution and
the recorded staleness adds the system's own k on top.

Clamping (as in ``asyncps train``): a version older than the oldest one kept does not exist yet
(the first r updates of a run, or just after a restore from a checkpoint, which keeps no history):
the pull is served the oldest version kept, and the applied push is counted as `clamped`. An
age above `depth` is a protocol error (INVALID_ARGUMENT): no worker of this run draws one.

Memory: `depth` copies of the shard's trainable variables (frozen ones never change and are
served live), allocated as versions accumulate, then reused in place (no allocation per push).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asyncps.config import StalenessConfig
from asyncps.ps.counters import HIST_BUCKETS, _trim  # (_trim: the histograms' one trailing-zero trimmer)
from asyncps.ps.errors import InvalidArgument


def max_staleness(cfg: StalenessConfig) -> int:
    """The largest r the distribution `cfg` can draw (`StalenessSampler.s_max`, tested equal)."""
    if cfg.distribution == "histogram":
        return max(cfg.histogram) if cfg.histogram else 0
    return cfg.s


def history_depth(cfg: StalenessConfig) -> int:
    """Versions a shard keeps: the largest r drawn in a controlled run, else none."""
    return max_staleness(cfg) if cfg.controlled else 0


class VersionHistory:
    """The values of the last `depth` versions of some variables: a ring indexed by version.

    Versions are recorded in order (v, v + 1, ...; the same v again overwrites it, when the
    update of v was dropped); the servable ones are the unbroken run [low, high] ending just
    below the current version. A gap (the first record, or one after `clear`) starts a new run.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self._slots: dict[int, dict[str, np.ndarray]] = {}  # version % depth -> values, made on first use
        self._low, self._high = 0, -1  # the run of kept versions (empty when high < low)

    @property
    def nbytes(self) -> int:
        """Bytes held by the ring."""
        return sum(a.nbytes for slot in self._slots.values() for a in slot.values())

    def record(self, version: int, values: Mapping[str, np.ndarray]) -> None:
        """Keeps a copy of `values`, the state at `version` (call before the update that ends it)."""
        if self.depth == 0:
            return
        if version == self._high + 1 and self._high >= self._low:
            self._low = max(self._low, version - self.depth + 1)
        elif version != self._high or self._high < self._low:
            self._low = version  # a new run
        self._high = version
        slot = self._slots.get(version % self.depth)
        if slot is None:
            slot = self._slots[version % self.depth] = {n: np.empty_like(v) for n, v in values.items()}
        for name, value in values.items():
            np.copyto(slot[name], value)

    def oldest(self, current: int) -> int:
        """The oldest version that can be served while the shard is at `current`."""
        # high == current: the update of `current` was recorded, then dropped by the policy
        return self._low if current - 1 <= self._high <= current and self._high >= self._low else current

    def resolve(self, current: int, age: int) -> int:
        """The version a pull of `age` gets at `current`: current - age, clamped to the oldest kept."""
        if age and not self.depth:
            raise InvalidArgument(f"pull age {age}: this shard keeps no version history (staleness.controlled is false)")
        if not 0 <= age <= self.depth:
            raise InvalidArgument(f"pull age {age} is outside the shard's version history [0, {self.depth}] "
                                  f"(staleness.controlled with largest staleness {self.depth})")
        return max(current - age, self.oldest(current))

    def values(self, version: int) -> dict[str, np.ndarray]:
        """The kept values of `version` (live arrays of the ring: copy what you keep)."""
        return self._slots[version % self.depth]

    def clear(self) -> None:
        """Forgets every version (after a restore: the old versions belong to another history)."""
        self._low, self._high = 0, -1


class AgeCounters:
    """Per worker, the served and requested ages of its applied pushes, and its clamped pulls."""

    __slots__ = ("served", "requested", "clamped", "pending")

    def __init__(self):
        self.served = [0] * HIST_BUCKETS
        self.requested = [0] * HIST_BUCKETS
        self.clamped = 0
        self.pending: tuple[int, int, int] | None = None  # the last pull: (version served, served age, requested)

    def pulled(self, served_version: int, served_age: int, requested: int) -> None:
        """Remembers what the worker's latest pull was served."""
        self.pending = (served_version, served_age, requested)

    def applied(self, read_version: int) -> None:
        """Counts an applied push whose gradient was computed at `read_version`, if it is the
        version the worker's latest pull was served (a push from an older read is not counted)."""
        if self.pending is None or self.pending[0] != read_version:
            return
        _, served, requested = self.pending
        self.served[min(served, HIST_BUCKETS - 1)] += 1
        self.requested[min(requested, HIST_BUCKETS - 1)] += 1
        self.clamped += served < requested
        self.pending = None

    def stats(self) -> dict:
        """Fields of WorkerStats (histograms trimmed of trailing zeros)."""
        return {"served_age_histogram": _trim(self.served), "requested_age_histogram": _trim(self.requested),
                "clamped": self.clamped}

