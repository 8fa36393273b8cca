"""The core of one parameter-server shard: variables, versions, the lock, pull and push.

Pure domain code (numpy + threading), no gRPC: the servicer in ``asyncps.ps.servicer`` is a thin
layer that decodes messages, calls these methods and maps `ShardError` to status codes.

What varies is injected, as objects, not branches here:
- the consistency mode (ps/consistency.py: async, ssp, sync) decides whether a worker may pull
  now and what a push does (apply, join a round, drop);
- the update rule (ps/update_rule.py: optimizer + schedule + staleness policy) decides what an
  update does to a value;
- the read views (ps/views.py) decide which values a pull is served: the current ones, those of
  `age` versions ago (controlled staleness), an evaluation milestone; and keep what DC-ASGD
  needs of a worker's read;
- observers (ps/observers.py) watch every state change: the update log, the age counters, the
  clock gap, and the views that keep past values.

Versions and staleness. The shard keeps ONE version counter, the number of updates applied
(async/ssp: one per applied push; sync: one per applied round). A pull returns it with the
values; a push carries the version it read (`read_version`). The staleness of an applied push is
``version (before this push is applied) - read_version``: the number of updates the worker did
not see. Each variable also counts its own updates (`Variable.updates`), the `step` passed to
the optimizer (TF's per-slot iteration); the learning-rate schedule is driven by the shard
version. The two agree when every push carries every trainable variable of the shard.

Pause: pushes that arrive while paused wait (up to their deadline) for `resume`; pulls proceed.
Since every update runs under the shard's lock, `pause` returns only once none is in progress.

Cap (`cap_at`, `train.max_steps` in a shard process): once the version reaches the cap, pushes
wait as if paused, whatever `resume` says, so a run applies exactly max_steps updates however
late the chief notices; the chief's stop then ends those waits.

Id-keyed tables (ps/table_service.py, ps/tables.py; docs/sparse.md): besides its variables a
shard may hold its hash-placed part of embedding tables declared at Init, kept by a
`TableService` the shard owns. A pull may ask for the rows of some ids (`tables`), read under
the same lock after the consistency wait, with each row's version; a push may carry
`TableGrad`s (protos/table_rows.py) that are applied in the same update as its dense gradients,
at the same learning rate. The shard version counts pushes as before; each row also counts its
own updates. What tables need of the mode and the policy, first-touch rows, capacity and
eviction, checkpoints of table rows and their stats are the service's.

Settings: a shard reads a `ShardSettings` (ps/shard_settings.py), not the whole Config;
`Shard(cfg)` and `Shard.from_config(cfg)` build one from a Config.

Concurrency: one `threading.Condition` guards all state. Decoding and validation happen before
taking it (variable shapes and dtypes never change after init), so only the update itself and
the copies made for pulls are serialized.
"""
from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from asyncps.config import Config
from asyncps.ps import validate
from asyncps.ps.consistency import make_consistency
from asyncps.ps.counters import WorkerCounters, total_histogram
from asyncps.ps.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ShardError,
    Unavailable,
)
from asyncps.ps.shard_settings import ShardSettings
from asyncps.ps.table_service import TableService
from asyncps.ps.tables import EmbeddingTable
from asyncps.protos.table_rows import TableGrad
from asyncps.shard_types import PushResult, Snapshot
from asyncps.ps.observers import AgeObserver, ClockGap, Observers, UpdateLogObserver
from asyncps.ps.update_rule import POLICY_SLOT, UpdateRule, Variable
from asyncps.ps.views import Milestones, PastVersions, ValuesRead, current_values

__all__ = ["POLICY_SLOT", "PushResult", "Shard", "Variable"]


class Shard:
    """The state and the rules of one parameter-server shard (see the module docstring).

    `settings` (a ShardSettings, or a Config it is built from); `rule` (an UpdateRule),
    `consistency` (a mode of ps/consistency.py) and `observers` default to what the settings ask
    for; `optimizer`/`schedule`/`policy` replace parts of the default rule.
    """

    def __init__(self, settings: ShardSettings | Config, index: int = 0, optimizer=None, schedule=None, policy=None,
                 update_log=None, rule: UpdateRule | None = None, consistency=None, observers=()):
        if not isinstance(settings, ShardSettings):  # callers that hold a Config (the replayer, benches)
            settings = ShardSettings.from_config(settings)
        self.settings = settings
        self.index = index
        self.num_workers = settings.workers
        self._frozen_patterns = settings.frozen
        if rule is None:
            rule = UpdateRule.from_config(settings.optimizer)
            rule.optimizer, rule.schedule, rule.policy = (optimizer or rule.optimizer, schedule or rule.schedule,
                                                          policy or rule.policy)
        self.rule = rule
        self.consistency = consistency or make_consistency(settings)
        self._cond = threading.Condition()  # guards every attribute below
        self._vars: dict[str, Variable] = {}
        self.table_service = TableService(settings, index, rule, self._cond)  # id-keyed tables
        self._initialized = False
        self.version = 0
        self.workers: dict[int, WorkerCounters] = {}
        self._paused = False
        self._cap: int | None = None  # no update applies once the version reaches it (cap_at)
        self._stopping = False
        self._rejected_unknown = 0
        # read views that keep values, and the other observers
        self.past = PastVersions(settings.history_depth)  # controlled staleness (ps/history.py)
        self.milestones = Milestones()  # the chief's evaluations (keep_milestones)
        self.values_read = ValuesRead()  # DC-ASGD
        self.ages = AgeObserver()
        self.clock_gap = ClockGap()
        self.observers = Observers([self.past, self.milestones, self.values_read, self.ages, self.clock_gap])
        if update_log is not None:  # every state change, for `asyncps replay`
            self.observers.add(UpdateLogObserver(update_log))
        for observer in observers:
            self.observers.add(observer)

    @classmethod
    def from_config(cls, cfg: Config, index: int = 0, **kw: Any) -> "Shard":
        """A shard of the run `cfg` (its ShardSettings built here); `kw` as for the constructor."""
        return cls(ShardSettings.from_config(cfg), index, **kw)

    @property
    def mode(self) -> str:
        return self.consistency.name

    # ------------------------------------------------------------------------------------------
    # Control

    @property
    def num_variables(self) -> int:
        """Number of variables (or blocks) on the shard."""
        return len(self._vars)

    @property
    def variables(self) -> Mapping[str, Variable]:
        """The variables by name, for validation outside the lock: their names, shapes and dtypes
        never change once initialized (a restore swaps in a new dict, never mutates this one)."""
        return self._vars

    @property
    def stopping(self) -> bool:
        """`stop` was called: waiting calls were woken with Unavailable, new waits fail."""
        return self._stopping

    def check_pusher(self, worker: int) -> None:
        """Raises unless the shard is initialized and `worker` registered and active (what
        `push` checks first), so a transport can refuse before reading a payload."""
        with self._cond:
            self._require_init()
            self._worker(worker)

    def frozen(self, name: str) -> bool:
        """True when `name` matches a `train.frozen` pattern."""
        return any(fnmatch.fnmatchcase(name, p) for p in self._frozen_patterns)

    @property
    def tables(self) -> Mapping[str, EmbeddingTable]:
        """The id-keyed tables by name (fixed once initialized, like `variables`): for
        validation outside the lock, names and dims only."""
        return self.table_service.tables

    def init(self, values: Mapping[str, np.ndarray], tables: Mapping[str, int] | None = None) -> bool:
        """Creates the variables (copies of `values`) and the id-keyed `tables` ({name: dim});
        True if created, False if already there.

        A later Init with identical names, shapes, dtypes and tables is a no-op; different specs
        raise FailedPrecondition.
        """
        validate.check_initial_values(values, self.frozen)
        tables = dict(tables or {})
        self.table_service.check_specs(tables, values, self.mode)
        with self._cond:
            if self._initialized:
                self._check_same_specs(values, "Init")
                self.table_service.check_same(tables)
                return False
            self._vars = {name: self.rule.new_variable(v, self.frozen(name)) for name, v in sorted(values.items())}
            self.table_service.create(tables)
            self._initialized = True
            return True

    def _check_same_specs(self, values: Mapping[str, np.ndarray], what: str) -> None:
        mine = {n: (v.value.shape, v.value.dtype.name) for n, v in self._vars.items()}
        theirs = {n: (tuple(v.shape), v.dtype.name) for n, v in values.items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise FailedPrecondition(
                f"{what} does not match the variables of shard {self.index} (first differences: {diff})"
            )

    def register_worker(self, worker: int, retire: bool = False) -> tuple[int, int]:
        """Makes `worker` known (or retires it); returns its (clock, last_seq) on this shard."""
        if not 0 <= worker < self.num_workers:
            raise InvalidArgument(f"worker index {worker} is out of range [0, {self.num_workers})")
        with self._cond:
            w = self.workers.setdefault(worker, WorkerCounters(worker))
            w.active = not retire
            self.observers.registered(worker, retire, self.version)
            if retire:
                self.consistency.retired(self, worker)
                self._cond.notify_all()  # ssp minimum and sync quorum changed
            return w.clock, w.last_seq

    def pause(self) -> int:
        """Stops applying updates; returns the version at which they stopped."""
        with self._cond:
            self._paused = True
            return self.version

    def cap_at(self, version: int | None) -> None:
        """Applies no update past `version` (None: no cap); pushes beyond it wait."""
        with self._cond:
            self._cap = version
            self._cond.notify_all()

    def keep_milestones(self, every: int) -> None:
        """Saves the values of each version that is a multiple of `every` (0: none), until a
        pull `at_version` a later one (the chief's evaluations at exact global steps)."""
        with self._cond:
            self.milestones.every = every

    def _held(self) -> bool:
        """Pushes must wait: paused, or the version reached the cap. Caller holds the lock."""
        return self._paused or (self._cap is not None and self.version >= self._cap)

    def resume(self) -> int:
        """Resumes applying updates; waiting pushes proceed."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()
            return self.version

    def stop(self) -> None:
        """Wakes every waiting call with Unavailable; later waits fail at once."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------
    # Pull and push

    def pull(self, worker: int | None, names: Iterable[str] = (), timeout: float | None = None, export=None,
             age: int = 0, at_version: int = 0, tables: Mapping[str, np.ndarray] | None = None,
             with_values: bool = True):
        """(version, {name: copy of value}) of the named variables (all if `names` is empty).

        `age` (controlled staleness, ps/history.py): the values of ``age`` versions ago instead
        of the current ones, clamped to the oldest version kept; the version returned is theirs.
        `at_version` (the chief's evaluations): the values saved at exactly that version
        (`keep_milestones`), or the current ones when the shard is at it; NotFound otherwise.

        `worker` is None for the chief or an evaluator (never waits); a worker waits, up to
        `timeout` seconds, for the consistency mode to let it read (ssp bound, sync round).
        With `export`, returns ``export(version, live values)`` instead, computed under the lock:
        the servicer encodes straight from the live arrays (one copy instead of two); `export`
        must copy what it keeps.

        `tables` ({table: ids}): the rows of those ids too, read after the wait under the same
        lock, as {table: (ids, rows, versions)} copies: a worker's read makes missing rows (first
        touch), the chief's (`worker` None) makes none. Then the answer is (version, values,
        rows), or ``export(version, live values, rows=rows)``. `with_values` False: no variable
        values (only the rows).
        """
        deadline = _deadline(timeout)
        if tables:
            self.table_service.check_names(tables)
        with self._cond:
            self._require_init()
            wanted = self._names(names) if with_values else []
            if worker is not None:
                w = self._worker(worker)
                self._wait(lambda: self.consistency.may_pull(self, w), deadline, f"worker {worker} pull (mode {self.mode})")
            version, live = self._read_at(worker, age, wanted, at_version)
            extra = {"rows": self.table_service.read_rows(worker, tables)} if tables else {}
            keep_read = worker is not None and self.rule.needs_value_read
            if export is not None and not keep_read:
                return export(version, live, **extra)
            values = {name: value.copy() for name, value in live.items()}
            if keep_read and worker is not None:  # (keep_read implies it; said again for the type checker)
                self.values_read.remember(worker, version, values)
            if export is not None:
                return export(version, values, **extra)
            return (version, values, extra["rows"]) if tables else (version, values)

    def _read_at(self, worker: int | None, age: int, wanted: list[str], at_version: int = 0) -> tuple[int, dict]:
        """(version served, its live arrays) for a pull; caller holds the lock."""
        if at_version and at_version != self.version:
            return at_version, self.milestones.read(self.index, self.version, at_version, wanted)
        if not age and not self.past.depth:
            return self.version, current_values(self._vars, wanted)
        if age and not self.consistency.allows_past_reads:
            raise FailedPrecondition(f"shard {self.index}: controlled staleness (pull age {age}) needs "
                                     f"cluster.mode async or ssp, not {self.mode}")
        version, values = self.past.read(self.version, self._vars, wanted, age)
        if worker is not None:
            self.observers.served(worker, version, self.version, age)
        return version, values

    def push(self, worker: int, seq: int, read_version: int, grads: Mapping, timeout: float | None = None,
             checked: bool = False) -> PushResult:
        """Applies (or accumulates, drops, ignores as duplicate) one worker's gradients.

        Validation happens before anything changes; a rejected push raises ShardError and is
        counted against the worker. A push with ``seq <= last_seq`` of the worker is a retry:
        nothing is done and DUPLICATE is returned.

        `checked`: the caller made the dense gradients from this shard's own variable specs (a
        push at a shared-memory segment's layout: names, dtypes and shapes the shard chose) and
        proved their values finite, so they are not checked again (ps/shm_transport.py).
        """
        with self._cond:
            self._require_init()
            self._worker(worker)
        try:
            dense = {n: g for n, g in grads.items() if not isinstance(g, TableGrad)}
            # outside the lock: specs are fixed
            clean = dense if checked else validate.check_gradients(dense, self._vars)
            clean.update(self.table_service.check_grads(grads))
        except ShardError:
            self.count_rejected(worker)
            raise
        deadline = _deadline(timeout)
        with self._cond:
            w = self._worker(worker)
            while True:  # re-check after every wait: a retry may have been applied meanwhile
                if seq <= w.last_seq:
                    w.duplicates += 1
                    return PushResult("DUPLICATE", self.version, 0)
                if read_version < 0:
                    w.rejected += 1
                    raise InvalidArgument(f"worker {worker}: read_version {read_version} is negative")
                if read_version > self.version:  # restored to an older version since the pull
                    w.rejected += 1
                    raise OutOfRange(f"worker {worker}: read_version {read_version} is ahead of shard {self.index} "
                                     f"(now {self.version}; restored since the pull?)")
                if not self._held():
                    break
                self._wait(lambda: not self._held(), deadline, f"worker {worker} push while paused "
                           f"(or at the cap, train.max_steps)")
            had_read = bool(self.values_read.lookup(worker, read_version))
            result = self.consistency.push(self, w, seq, read_version, clean)
            self.observers.pushed(worker, seq, read_version, result.result, self.version, had_read)
            self.observers.clocks_moved(self.workers)
            self._cond.notify_all()  # ssp waiters: a clock moved; sync: a round may be applied
            return result

    # -- what a consistency mode calls, with the lock held --------------------------------------

    def update(self, grads: Mapping, staleness: int, read_version: int, worker: int | None) -> bool:
        """Runs the update rule on every variable in `grads` at the current version's learning
        rate; True if any was applied (an empty push counts as applied: it advances clock and
        version). The version does not move: `advance` does that."""
        value_read = self.values_read.lookup(worker, read_version)
        self.observers.updating(self.version, self._vars)
        lr = self.rule.learning_rate(self.version)
        applied = not grads
        for name, grad in grads.items():
            if isinstance(grad, TableGrad):  # checked at push: a known table, shapes, finite
                self.table_service.push(name, grad, lr)
                applied = True
                continue
            applied |= self.rule.apply(self._vars[name], grad, lr, staleness, value_read.get(name))
        return applied

    def update_combined(self, grads: list[tuple[Mapping, int]]) -> None:
        """One update from several pushes (n-softsync): per variable, every (gradients,
        staleness) pair through the staleness policy, averaged, one optimizer step."""
        self.observers.updating(self.version, self._vars)
        lr = self.rule.learning_rate(self.version)
        by_name: dict[str, list] = {}
        for g, staleness in grads:
            for name, grad in g.items():
                by_name.setdefault(name, []).append((grad, staleness))
        for name, pairs in by_name.items():
            self.rule.apply_combined(self._vars[name], pairs, lr)

    def advance(self) -> None:
        """One more update applied: the version moves."""
        self.version += 1
        self.observers.updated(self.version, self._vars)

    def min_clock(self, me: WorkerCounters) -> int:
        """Slowest clock among the active workers (unregistered ones count as 0)."""
        clocks = [
            self.workers[i].clock if i in self.workers else 0
            for i in range(self.num_workers)
            if i not in self.workers or self.workers[i].active
        ]
        return min(clocks, default=me.clock)

    # ------------------------------------------------------------------------------------------
    # Waiting (consistency, pause, cap)

    def _wait(self, ready: Callable[[], bool], deadline: float | None, what: str) -> None:
        """Waits on the condition until `ready()`; caller holds the lock."""
        while not ready():
            if self._stopping:
                raise Unavailable(f"shard {self.index} is stopping ({what})")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"{what}: still waiting at the deadline")
            self._cond.wait(remaining)

    # ------------------------------------------------------------------------------------------
    # Snapshot, restore, stats

    def snapshot(self) -> Snapshot:
        """Copies of values, slots and counters, all at one version."""
        with self._cond:
            self._require_init()
            slots = {n: v.saved_slots() for n, v in self._vars.items()}
            return Snapshot(
                version=self.version,
                values={n: v.value.copy() for n, v in self._vars.items()},
                slots={n: s for n, s in slots.items() if s},
                updates={n: v.updates for n, v in self._vars.items()},
                last_seq={i: w.last_seq for i, w in self.workers.items()},
                clocks={i: w.clock for i, w in self.workers.items()},
                optimizer=self.rule.name,
            )

    def restore(self, snap: Snapshot) -> int:
        """Replaces the whole state with `snap` (initializing the shard if needed); the version."""
        if snap.optimizer and snap.optimizer != self.rule.name:
            raise FailedPrecondition(f"snapshot holds {snap.optimizer!r} slots, shard {self.index} runs {self.rule.name!r}")
        validate.check_initial_values(snap.values, self.frozen)
        self._check_snapshot_counters(snap)
        fresh = {name: self.rule.new_variable(v, self.frozen(name)) for name, v in sorted(snap.values.items())}
        for name, var in fresh.items():
            var.fill_slots(name, snap.slots.get(name, {}), snap.updates.get(name, snap.version))
        with self._cond:
            if self._initialized:
                self._check_same_specs(snap.values, "Restore")
            self._vars, self._initialized, self.version = fresh, True, snap.version
            self.table_service.restored()  # staged tables go in, the others start empty
            for worker, seq in snap.last_seq.items():
                w = self.workers.setdefault(worker, WorkerCounters(worker))
                w.last_seq, w.clock = seq, snap.clocks.get(worker, 0)
                w.last_applied_seq = seq  # what the checkpoint's history may hold
            self.consistency.restored()
            self.observers.restored(self.version)
            self._cond.notify_all()
            return self.version

    def table_chunks(self, name: str, rows: int = 65536):
        """(updates, chunks): the table's update count and an iterator of its live rows in
        chunks of at most `rows`, each copied under the lock (TableService.chunks)."""
        with self._cond:
            self._require_init()
            return self.table_service.chunks(name, rows)

    def _check_snapshot_counters(self, snap: Snapshot) -> None:
        """Restore: a version >= 0 and per-worker counters of workers of this cluster only."""
        if snap.version < 0:
            raise InvalidArgument(f"snapshot version {snap.version} is negative")
        for what, counters, low in (("last_seq", snap.last_seq, -1), ("clocks", snap.clocks, 0)):
            for worker, value in counters.items():
                if not 0 <= worker < self.num_workers or value < low:
                    raise InvalidArgument(f"snapshot {what}[{worker}] = {value}: worker outside [0, "
                                          f"{self.num_workers}) or count below {low}")

    def stats(self, hot_ids: bool = False) -> dict:
        """Counters as a dict shaped like the StatsReply message (`hot_ids`: each table's
        hottest ids too, a pass over its rows)."""
        with self._cond:
            workers = [{**_worker_stats(w), **self.ages.stats(i)} for i, w in sorted(self.workers.items())]
            return {
                "shard": self.index,
                "version": self.version,
                "workers": workers,
                "histogram": total_histogram(self.workers.values()),
                "rejected_unknown": self._rejected_unknown,
                "paused": self._paused,
                "mode": self.mode,
                "initialized": self._initialized,
                "history_depth": self.past.depth,
                "history_bytes": self.past.history.nbytes,
                "max_clock_gap": self.clock_gap.max,
                "milestones_dropped": self.milestones.dropped,
                "tables": self.table_service.stats(hot_ids),
                **self.consistency.stats(),
            }

    # ------------------------------------------------------------------------------------------
    # Helpers (caller holds the lock unless said otherwise)

    def _require_init(self) -> None:
        if not self._initialized:
            raise FailedPrecondition(f"shard {self.index} has no variables yet (call Init first)")

    def _names(self, names: Iterable[str]) -> list[str]:
        wanted = list(names) or list(self._vars)
        for name in wanted:
            if name not in self._vars:
                raise NotFound(f"variable {name!r} is not held by shard {self.index}")
        return wanted

    def _worker(self, worker: int) -> WorkerCounters:
        w = self.workers.get(worker)
        if w is None:
            self._rejected_unknown += 1
            raise FailedPrecondition(f"worker {worker} is not registered with shard {self.index} (RegisterWorker first)")
        if not w.active:
            w.rejected += 1
            raise FailedPrecondition(f"worker {worker} was retired from shard {self.index}")
        return w

    def count_rejected(self, worker: int) -> None:
        """Counts a rejected push (e.g. a malformed stream) against its worker, if registered."""
        with self._cond:
            w = self.workers.get(worker)
            if w is not None:
                w.rejected += 1
            else:
                self._rejected_unknown += 1


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _worker_stats(w: WorkerCounters) -> dict:
    return {
        "worker": w.worker, "applied": w.applied, "dropped": w.dropped, "rejected": w.rejected,
        "duplicates": w.duplicates, "staleness_sum": w.staleness_sum, "staleness_max": w.staleness_max,
        "histogram": w.trimmed_histogram(), "last_seq": w.last_seq, "active": w.active,
        "reapplied": w.reapplied,
    }

