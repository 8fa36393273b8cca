"""Per-worker push counters and the staleness histogram: exact and cheap.

Recording one applied push costs a few integer increments on preallocated lists: no allocation.
`set_recording(False)` (config `telemetry.record_staleness: false`, set once by the shard's entry
point) keeps only the count of applied pushes: the baseline of bench/staleness_overhead.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

HIST_BUCKETS = 1024  # histogram[s] counts staleness s; the last bucket counts s >= 1023


class WorkerCounters:
    """What one shard knows about one worker: registration, clock, sequence and counters."""

    __slots__ = (
        "worker", "active", "clock", "last_seq", "applied", "dropped", "rejected", "duplicates",
        "staleness_sum", "staleness_max", "histogram", "last_applied_seq", "reapplied",
    )

    def __init__(self, worker: int):
        self.worker = worker
        self.active = True  # False once retired (dead): not waited for by ssp/sync
        self.clock = 0  # pushes of this worker the shard has processed (applied or dropped)
        self.last_seq = -1  # highest push sequence number seen
        self.last_applied_seq = -1  # highest seq applied in the shard's history (rewound by a restore)
        self.reapplied = 0  # pushes applied with a seq <= last_applied_seq: applied twice (never)
        self.applied = 0
        self.dropped = 0
        self.rejected = 0
        self.duplicates = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.histogram = [0] * HIST_BUCKETS

    def _record_staleness(self, staleness: int) -> None:
        """Counts one applied push of the given staleness (shard versions)."""
        self.applied += 1
        self.staleness_sum += staleness
        if staleness > self.staleness_max:
            self.staleness_max = staleness
        self.histogram[staleness if staleness < HIST_BUCKETS else -1] += 1  # no min(): a call costs more

    def _count_applied(self, staleness: int) -> None:
        """`record_applied` with staleness recording off: the count alone."""
        self.applied += 1

    # Counts one applied push of the given staleness: one of the two above, swapped on the class by
    # set_recording, so a push pays no branch on the setting
    record_applied: ClassVar[Callable[[WorkerCounters, int], None]] = _record_staleness

    def applied_seq(self, seq: int) -> None:
        """Witness of "no push applied twice", independent of the duplicate check on `last_seq`:
        applied seqs must increase, so every applied (worker, seq) is unique in the shard's
        history; one that does not is counted in `reapplied`."""
        if seq <= self.last_applied_seq:
            self.reapplied += 1
        self.last_applied_seq = max(self.last_applied_seq, seq)

    def trimmed_histogram(self) -> list[int]:
        """The histogram without its trailing zero buckets."""
        return _trim(self.histogram[:min(self.staleness_max, HIST_BUCKETS - 1) + 1])


def _trim(counts: list[int]) -> list[int]:
    end = len(counts)
    while end and counts[end - 1] == 0:
        end -= 1
    return counts[:end]


_RECORD = WorkerCounters._record_staleness


def set_recording(on: bool) -> None:
    """Staleness recording on (the default) or off, for every WorkerCounters of this process."""
    WorkerCounters.record_applied = _RECORD if on else WorkerCounters._count_applied


def recording() -> bool:
    """True while staleness is recorded."""
    return WorkerCounters.record_applied is _RECORD


def total_histogram(workers) -> list[int]:
    """Sum of the workers' histograms, trailing zeros trimmed (only the buckets up to the
    largest staleness seen are visited: the chief asks several times a second)."""
    total = [0] * HIST_BUCKETS
    for w in workers:
        for s in range(min(w.staleness_max, HIST_BUCKETS - 1) + 1):
            total[s] += w.histogram[s]
    return _trim(total)
