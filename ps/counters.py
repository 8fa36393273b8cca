"""Per-worker push counters and the staleness histogram: exact and cheap.

Recording one applied push costs a few integer increments on preallocated lists: no allocation.
"""
from __future__ import annotations

HIST_BUCKETS = 1024  # histogram[s] counts staleness s; the last bucket counts s >= 1023


class WorkerCounters:
    """What one shard knows about one worker: registration, clock, sequence and counters."""

    __slots__ = (
        "worker", "active", "clock", "last_seq", "applied", "dropped", "rejected", "duplicates",
        "staleness_sum", "staleness_max", "histogram",
    )

    def __init__(self, worker: int):
        self.worker = worker
        self.active = True  # False once retired (dead): not waited for by ssp/sync
        self.clock = 0  # pushes of this worker the shard has processed (applied or dropped)
        self.last_seq = -1  # highest push sequence number seen
        self.applied = 0
        self.dropped = 0
        self.rejected = 0
        self.duplicates = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.histogram = [0] * HIST_BUCKETS

    def record_applied(self, staleness: int) -> None:
        """Counts one applied push of the given staleness (shard versions)."""
        self.applied += 1
        self.staleness_sum += staleness
        if staleness > self.staleness_max:
            self.staleness_max = staleness
        self.histogram[min(staleness, HIST_BUCKETS - 1)] += 1

    def trimmed_histogram(self) -> list[int]:
        """The histogram without its trailing zero buckets."""
        return _trim(self.histogram)


def _trim(counts: list[int]) -> list[int]:
    end = len(counts)
    while end and counts[end - 1] == 0:
        end -= 1
    return counts[:end]


def total_histogram(workers) -> list[int]:
    """Sum of the workers' histograms, trailing zeros trimmed."""
    total = [0] * HIST_BUCKETS
    for w in workers:
        for s, n in enumerate(w.histogram):
            total[s] += n
    return _trim(total)
