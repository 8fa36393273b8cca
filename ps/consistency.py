"""Consistency modes of a shard, as objects the shard core is given: `async`, `ssp`, `sync`.

Modes: async, ssp, sync and softsync (n-softsync). A mode decides two things: whether a worker may pull now (`may_pull`, waited on under the
shard's lock) and what a valid push does (`push`: apply now, join a round, drop). Everything
else (validation, duplicates, the pause and the cap, counters, observers) is the core's. A new
mode is a new class registered in `MODES`, not a branch in the core.

Clocks: a worker's clock is the number of its pushes the shard has processed.

- async: a push is applied on arrival.
- ssp with bound s: a worker pull waits while ``clock(worker) > min(clock of active workers) + s``
  (workers not yet registered count with clock 0; retired ones are ignored). In shard versions,
  with M workers, an applied push is at most ``(M - 1) * (2 s + 1)`` versions stale.
- sync: a round collects one gradient per worker read at the current version; when
  ``workers - retired - backup_workers`` gradients are in, their average is applied once (one
  version). A gradient read at an older version belongs to a finished round: dropped and counted.
  A worker whose gradient is in the pending round waits at pull until the round is applied.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from asyncps.shard_types import PushResult
from asyncps.sparse import SparseRows
from asyncps.ps.counters import WorkerCounters
from asyncps.ps.errors import FailedPrecondition

if TYPE_CHECKING:  # the core hands itself to the mode; no import cycle at run time
    from asyncps.ps.shard import Shard


class Async:
    """Apply every push on arrival."""

    name = "async"
    allows_past_reads = True  # controlled staleness (pulls of an older version) makes sense here

    def may_pull(self, core: "Shard", w: WorkerCounters) -> bool:
        return True

    def push(self, core: "Shard", w: WorkerCounters, seq: int, read_version: int, grads: Mapping) -> PushResult:
        staleness = core.version - read_version
        applied = core.update(grads, staleness, read_version, w.worker)
        w.last_seq, w.clock = seq, w.clock + 1
        if applied:
            w.applied_seq(seq)
            w.record_applied(staleness)
            core.observers.applied(w.worker, read_version)
            core.advance()
        else:
            w.dropped += 1  # the staleness policy dropped every gradient
        return PushResult("APPLIED" if applied else "DROPPED", core.version, staleness if applied else 0)

    def retired(self, core: "Shard", worker: int) -> None:
        """A worker left: nothing waits on it here."""

    def restored(self) -> None:
        """The shard's state was replaced: forget anything pending."""

    def stats(self) -> dict:
        return {"rounds": 0}


class SSP(Async):
    """Async, but a worker may not run more than `bound` clocks ahead of the slowest."""

    name = "ssp"

    def __init__(self, bound: int):
        self.bound = bound

    def may_pull(self, core: "Shard", w: WorkerCounters) -> bool:
        return w.clock <= core.min_clock(w) + self.bound


class Sync:
    """Rounds of one gradient per worker, averaged and applied once (backup workers: the first
    workers - b complete a round)."""

    name = "sync"
    allows_past_reads = False

    def __init__(self, num_workers: int, backup_workers: int):
        self.num_workers, self.backup = num_workers, backup_workers
        self.round: dict[int, Mapping] = {}  # worker -> its gradients in the pending round
        self.rounds = 0

    def may_pull(self, core: "Shard", w: WorkerCounters) -> bool:
        return w.worker not in self.round

    def push(self, core: "Shard", w: WorkerCounters, seq: int, read_version: int, grads: Mapping) -> PushResult:
        if read_version < core.version:
            w.last_seq, w.clock, w.dropped = seq, w.clock + 1, w.dropped + 1
            return PushResult("DROPPED", core.version, 0)
        if w.worker in self.round:
            w.rejected += 1
            raise FailedPrecondition(f"worker {w.worker} already sent a gradient for round {self.rounds} (pull first)")
        w.last_seq, w.clock = seq, w.clock + 1
        self.round[w.worker] = grads
        applied = self._maybe_apply(core)
        return PushResult("APPLIED" if applied else "ACCUMULATED", core.version, 0)

    def retired(self, core: "Shard", worker: int) -> None:
        """A retired worker's gradient leaves the round, which may now be complete."""
        self.round.pop(worker, None)
        self._maybe_apply(core)

    def _maybe_apply(self, core: "Shard") -> bool:
        if not self.round or len(self.round) < self._quorum(core):
            return False
        core.update(average(self.round.values()), 0, core.version, None)
        for worker in self.round:
            core.workers[worker].record_applied(0)  # every gradient of a round read this version
        self.round.clear()
        core.advance()
        self.rounds += 1
        return True

    def _quorum(self, core: "Shard") -> int:
        retired = sum(not w.active for w in core.workers.values())
        return max(1, self.num_workers - retired - self.backup)

    def restored(self) -> None:
        self.round.clear()

    def stats(self) -> dict:
        return {"rounds": self.rounds}


class SoftSync(Async):
    """n-softsync (Zhang, Gupta, Lian & Liu, IJCAI 2016): the shard applies ONE update for every
    c = max(1, workers // n) gradients it receives, from any workers, averaging them; nobody
    waits (pulls are never held). Each gradient's staleness is the version when its batch is
    applied minus the version it read, recorded per gradient; `optimizer.staleness_policy:
    lr_scale` scales each one by 1/tau (alpha/tau; alpha when tau = 0) before the average.
    n = 1 collects one gradient per worker's worth (hardsync-like, without the barrier); n =
    workers applies every gradient (async)."""

    name = "softsync"

    def __init__(self, num_workers: int, n: int):
        self.c = max(1, num_workers // n)
        self.pending: list[tuple[int, int, int, Mapping]] = []  # (worker, seq, read_version, grads)
        self.rounds = 0

    def push(self, core: "Shard", w: WorkerCounters, seq: int, read_version: int, grads: Mapping) -> PushResult:
        w.last_seq, w.clock = seq, w.clock + 1
        self.pending.append((w.worker, seq, read_version, grads))
        if len(self.pending) < self.c:
            return PushResult("ACCUMULATED", core.version, 0)
        batch, self.pending = self.pending, []
        staleness = {(worker, s): core.version - read for worker, s, read, _ in batch}
        core.update_combined([(g, staleness[(worker, s)]) for worker, s, _, g in batch])
        for worker, s, read, _ in batch:
            counters = core.workers[worker]
            counters.applied_seq(s)
            counters.record_applied(staleness[(worker, s)])
            core.observers.applied(worker, read)
        core.advance()
        self.rounds += 1
        return PushResult("APPLIED", core.version, staleness[(w.worker, seq)])

    def restored(self) -> None:
        self.pending.clear()

    def stats(self) -> dict:
        return {"rounds": self.rounds}


MODES = {"async": lambda c: Async(), "ssp": lambda c: SSP(c.staleness_bound),
         "sync": lambda c: Sync(c.workers, c.backup_workers), "softsync": lambda c: SoftSync(c.workers, c.softsync_n)}


def make_consistency(cluster_cfg):
    """The mode object for `cluster.mode` (the config schema takes its choices from MODES);
    `cluster_cfg` is a ClusterConfig or a ShardSettings (ps/shard_settings.py: same field names)."""
    return MODES[cluster_cfg.mode](cluster_cfg)


def average(grads_by_worker: Iterable[Mapping]) -> dict:
    """Mean, per variable, of the gradients of one sync round (sparse rows: summed per row)."""
    dense: dict[str, list] = {}
    for grads in grads_by_worker:
        for name, g in grads.items():
            dense.setdefault(name, []).append(g)
    return {name: _mean(gs) for name, gs in dense.items()}


def _mean(grads: list):
    if not isinstance(grads[0], SparseRows):
        total = grads[0].copy()
        for g in grads[1:]:
            total += g
        total /= len(grads)
        return total
    rows = np.concatenate([g.rows for g in grads])
    values = np.concatenate([g.values for g in grads])
    unique, inverse = np.unique(rows, return_inverse=True)
    summed = np.zeros((len(unique), *values.shape[1:]), dtype=values.dtype)
    np.add.at(summed, inverse, values)
    summed /= len(grads)
    return SparseRows(unique, summed)
