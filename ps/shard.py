"""One parameter-server shard: variables, optimizer slots, versions, consistency modes.

Pure domain code (numpy + threading), no gRPC: the servicer in ``asyncps.ps.servicer`` is a thin
layer that decodes messages, calls these methods and maps `ShardError` to status codes.

Versions and staleness. The shard keeps ONE version counter, the number of updates applied
(async/ssp: one per applied push; sync: one per applied round). A pull returns it with the
values; a push carries the version it read (`read_version`). The staleness of an applied push is
``version (before this push is applied) - read_version``: the number of updates the worker did
not see. Each variable also counts its own updates (`Variable.updates`), the `step` passed to
the optimizer (TF's per-slot iteration); the learning-rate schedule is driven by the shard
version. The two agree when every push carries every trainable variable of the shard.

Clocks (ssp): a worker's clock is the number of its pushes the shard has processed. A worker
pull waits while ``clock(worker) > min(clock of active workers) + staleness_bound`` (workers not
yet registered count with clock 0; retired ones are ignored). So a worker can start clock
``c + s + 1`` only once the slowest worker finished clock ``c``. In shard versions, with M
workers, an applied push is at most ``(M - 1) * (2 s + 1)`` versions stale.

Sync: a round collects one gradient per worker read at the current version; when
``workers - retired - backup_workers`` gradients are in, their average is applied once (one
version). A gradient read at an older version belongs to a finished round: dropped and counted.
A worker whose gradient is in the pending round waits at pull until the round is applied.

Controlled staleness (``staleness.controlled``): the shard keeps its last s_max versions and a
worker pull may ask for the values of ``age`` versions ago; see ``asyncps.ps.history``.

Pause: pushes that arrive while paused wait (up to their deadline) for `resume`; pulls proceed.
Since every update runs under the shard's lock, `pause` returns only once none is in progress.

Cap (`cap_at`, `train.max_steps` in a shard process): once the version reaches the cap, pushes
wait as if paused, whatever `resume` says, so a run applies exactly max_steps updates however
late the chief notices; the chief's stop then ends those waits.

Concurrency: one `threading.Condition` guards all state. Decoding and validation happen before
taking it (variable shapes and dtypes never change after init), so only the update itself and
the copies made for pulls are serialized.
"""
from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from asyncps.config import Config
from asyncps.protos.codec import Snapshot, SparseRows
from asyncps.ps import validate
from asyncps.ps.counters import WorkerCounters, total_histogram
from asyncps.ps.history import AgeCounters, VersionHistory, history_depth
from asyncps.ps.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ShardError,
    Unavailable,
)

POLICY_SLOT = "policy:"  # prefix of staleness-policy state in snapshots
# Evaluation milestones kept at once (keep_milestones): as many as fit in MILESTONE_BYTES, at
# least MIN and at most MAX (a fast small model can pass several between two polls of the chief).
MIN_MILESTONES, MAX_MILESTONES, MILESTONE_BYTES = 4, 256, 64 << 20


@dataclass
class Variable:
    """One variable (or block of rows) on the shard."""

    value: np.ndarray
    frozen: bool
    slots: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer slots, like value
    policy_state: dict[str, np.ndarray] = field(default_factory=dict)  # staleness-policy state
    updates: int = 0  # updates applied to this variable (the optimizer's step)


class PushResult(NamedTuple):
    """What the shard did with a push: APPLIED, ACCUMULATED, DROPPED or DUPLICATE."""

    result: str
    version: int
    staleness: int


class Shard:
    """The state and the rules of one parameter-server shard (see the module docstring)."""

    def __init__(self, cfg: Config, index: int = 0, optimizer=None, schedule=None, policy=None, update_log=None):
        from asyncps.ps.optim import make_optimizer, make_schedule, make_staleness_policy

        self.index = index
        self.mode = cfg.cluster.mode
        self.num_workers = cfg.cluster.workers
        self._bound = cfg.cluster.staleness_bound
        self._backup = cfg.cluster.backup_workers
        self._frozen_patterns = tuple(cfg.train.frozen)
        self._opt = optimizer or make_optimizer(cfg.optimizer)
        self._schedule = schedule or make_schedule(cfg.optimizer)
        self._policy = policy or make_staleness_policy(cfg.optimizer.staleness_policy)
        self._cond = threading.Condition()  # guards every attribute below
        self._vars: dict[str, Variable] = {}
        self._initialized = False
        self.version = 0
        self._workers: dict[int, WorkerCounters] = {}
        self._paused = False
        self._cap: int | None = None  # no update applies once the version reaches it (cap_at)
        self._stopping = False
        self._round: dict[int, dict] = {}  # sync: worker -> its gradients in the pending round
        self._rounds = 0
        self._rejected_unknown = 0
        self._read: dict[int, tuple[int, dict]] = {}  # dcasgd: worker -> (version, values read)
        self._log = update_log  # a ps.update_log.ShardLog: every state change, for `asyncps replay`
        self._history = VersionHistory(history_depth(cfg.staleness))  # controlled staleness (ps/history.py)
        self._ages: dict[int, AgeCounters] = {}  # controlled staleness: worker -> ages served
        self._milestone_every = 0  # keep the values of every version that is a multiple (keep_milestones)
        self._milestones: dict[int, dict[str, np.ndarray]] = {}  # version -> values, oldest first
        self._milestones_dropped = 0
        self._max_clock_gap = 0

    # ------------------------------------------------------------------------------------------
    # Control

    @property
    def num_variables(self) -> int:
        """Number of variables (or blocks) on the shard."""
        return len(self._vars)

    def frozen(self, name: str) -> bool:
        """True when `name` matches a `train.frozen` pattern."""
        return any(fnmatch.fnmatchcase(name, p) for p in self._frozen_patterns)

    def init(self, values: Mapping[str, np.ndarray]) -> bool:
        """Creates the variables (copies of `values`); True if created, False if already there.

        A later Init with identical names, shapes and dtypes is a no-op; different specs raise
        FailedPrecondition.
        """
        validate.check_initial_values(values, self.frozen)
        with self._cond:
            if self._initialized:
                self._check_same_specs(values, "Init")
                return False
            self._vars = {name: self._new_variable(name, v) for name, v in sorted(values.items())}
            self._initialized = True
            return True

    def _new_variable(self, name: str, value: np.ndarray) -> Variable:
        value = np.array(value, copy=True)  # writable, owned by the shard
        if self.frozen(name):
            return Variable(value, frozen=True)
        return Variable(value, False, self._opt.init_slots(value), self._policy.init_state(value))

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
            w = self._workers.setdefault(worker, WorkerCounters(worker))
            w.active = not retire
            if self._log is not None:
                self._log.register(worker, retire, self.version)
            if retire:
                self._round.pop(worker, None)
                self._maybe_apply_round()
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
            self._milestone_every = every

    def _after_update(self) -> None:
        """Bookkeeping after the version moved. Caller holds the lock."""
        every = self._milestone_every
        if every and self.version % every == 0:
            self._milestones[self.version] = {n: v.value.copy() for n, v in self._vars.items()}
            size = sum(v.value.nbytes for v in self._vars.values()) or 1
            while len(self._milestones) > max(MIN_MILESTONES, min(MAX_MILESTONES, MILESTONE_BYTES // size)):
                # the chief fell behind: the oldest goes
                del self._milestones[next(iter(self._milestones))]
                self._milestones_dropped += 1

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
             age: int = 0, at_version: int = 0):
        """(version, {name: copy of value}) of the named variables (all if `names` is empty).

        `age` (controlled staleness, ps/history.py): the values of ``age`` versions ago instead
        of the current ones, clamped to the oldest version kept; the version returned is theirs.
        `at_version` (the chief's evaluations): the values saved at exactly that version
        (`keep_milestones`), or the current ones when the shard is at it; NotFound otherwise.

        `worker` is None for the chief or an evaluator (never waits); a worker waits, up to
        `timeout` seconds, for the ssp bound or its sync round (see the module docstring).
        With `export`, returns ``export(version, live values)`` instead, computed under the lock:
        the servicer encodes straight from the live arrays (one copy instead of two); `export`
        must copy what it keeps.
        """
        deadline = _deadline(timeout)
        with self._cond:
            self._require_init()
            wanted = self._names(names)
            if worker is not None:
                w = self._worker(worker)
                self._wait(lambda: self._may_pull(w), deadline, f"worker {worker} pull (mode {self.mode})")
            version, live = self._read_at(worker, age, wanted, at_version)
            if export is not None and not (worker is not None and self._policy.needs_value_read):
                return export(version, live)
            values = {name: value.copy() for name, value in live.items()}
            if worker is not None and self._policy.needs_value_read:
                self._read[worker] = (version, values)  # never written to afterwards (export only reads)
            if export is not None:
                return export(version, values)
            return version, values

    def _read_at(self, worker: int | None, age: int, wanted: list[str], at_version: int = 0) -> tuple[int, dict]:
        """(version served, its live arrays) for a pull of `age`; caller holds the lock."""
        if at_version and at_version != self.version:
            if at_version not in self._milestones:
                raise NotFound(f"shard {self.index}: version {at_version} is not kept (now {self.version}; kept: "
                               f"{sorted(self._milestones)[:8]})")
            for older in [v for v in self._milestones if v < at_version]:  # read in order: done with them
                del self._milestones[older]
            return at_version, {name: self._milestones[at_version][name] for name in wanted}
        if not age and not self._history.depth:
            return self.version, {name: self._vars[name].value for name in wanted}
        if age and self.mode == "sync":
            raise FailedPrecondition(f"shard {self.index}: controlled staleness (pull age {age}) needs "
                                     f"cluster.mode async or ssp, not sync")
        version = self._history.resolve(self.version, age)
        if worker is not None:
            self._ages.setdefault(worker, AgeCounters()).pulled(version, self.version - version, age)
        kept = self._history.values(version) if version < self.version else {}
        return version, {name: kept[name] if name in kept else self._vars[name].value for name in wanted}

    def push(self, worker: int, seq: int, read_version: int, grads: Mapping, timeout: float | None = None) -> PushResult:
        """Applies (or accumulates, drops, ignores as duplicate) one worker's gradients.

        Validation happens before anything changes; a rejected push raises ShardError and is
        counted against the worker. A push with ``seq <= last_seq`` of the worker is a retry:
        nothing is done and DUPLICATE is returned.
        """
        with self._cond:
            self._require_init()
            self._worker(worker)
        try:
            clean = validate.check_gradients(grads, self._vars)  # outside the lock: specs are fixed
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
            had_read = self._log is not None and bool(self._values_read(worker, read_version))
            push = self._push_sync if self.mode == "sync" else self._push_async
            result = push(w, seq, read_version, clean)
            if self._log is not None:
                self._log.push(worker, seq, read_version, result.result, self.version, had_read)
            return result

    def _push_async(self, w: WorkerCounters, seq: int, read_version: int, grads: Mapping) -> PushResult:
        """async/ssp: apply now. Caller holds the lock."""
        staleness = self.version - read_version
        value_read = self._values_read(w.worker, read_version)
        if self._history.depth:  # controlled staleness: keep this version before it changes
            self._history.record(self.version, {n: v.value for n, v in self._vars.items() if not v.frozen})
        lr = self._schedule(self.version)
        applied = not grads  # an empty push still counts (it advances clock and version)
        for name, grad in grads.items():
            applied |= self._apply(name, grad, lr, staleness, value_read.get(name))
        w.last_seq, w.clock = seq, w.clock + 1
        if applied:
            w.applied_seq(seq)
            w.record_applied(staleness)
            if w.worker in self._ages:
                self._ages[w.worker].applied(read_version)
            self.version += 1
            self._after_update()
        else:
            w.dropped += 1  # the staleness policy dropped every gradient
        self._note_clock_gap()
        self._cond.notify_all()  # ssp waiters: a clock moved
        return PushResult("APPLIED" if applied else "DROPPED", self.version, staleness if applied else 0)

    def _push_sync(self, w: WorkerCounters, seq: int, read_version: int, grads: Mapping) -> PushResult:
        """sync: join the pending round (or drop a late gradient). Caller holds the lock."""
        if read_version < self.version:
            w.last_seq, w.clock, w.dropped = seq, w.clock + 1, w.dropped + 1
            return PushResult("DROPPED", self.version, 0)
        if w.worker in self._round:
            w.rejected += 1
            raise FailedPrecondition(f"worker {w.worker} already sent a gradient for round {self._rounds} (pull first)")
        w.last_seq, w.clock = seq, w.clock + 1
        self._round[w.worker] = grads
        applied = self._maybe_apply_round()
        return PushResult("APPLIED" if applied else "ACCUMULATED", self.version, 0)

    def _maybe_apply_round(self) -> bool:
        """Applies the pending sync round once enough gradients are in. Caller holds the lock."""
        if self.mode != "sync" or not self._round or len(self._round) < self._quorum():
            return False
        lr = self._schedule(self.version)
        for name, grad in _average(self._round.values()).items():
            self._apply(name, grad, lr, 0, None)
        for worker in self._round:
            self._workers[worker].record_applied(0)  # every gradient of a round read this version
        self._round.clear()
        self.version += 1
        self._after_update()
        self._rounds += 1
        self._cond.notify_all()  # pulls waiting for the round
        return True

    def _apply(self, name: str, grad, lr: float, staleness: int, value_read) -> bool:
        """One optimizer update of one variable, through the staleness policy; False if dropped."""
        var = self._vars[name]
        sparse = isinstance(grad, SparseRows)
        rows, g = (grad.rows, grad.values) if sparse else (None, grad)
        adjusted = self._policy.adjust(g, staleness, var.value, value_read, var.policy_state, rows)
        if adjusted.grad is None:
            return False
        rate = lr * adjusted.lr_scale
        if sparse:
            self._opt.apply_sparse(var.value, rows, adjusted.grad, var.slots, rate, var.updates)
        else:
            self._opt.apply_dense(var.value, adjusted.grad, var.slots, rate, var.updates)
        var.updates += 1
        return True

    def _values_read(self, worker: int, read_version: int) -> dict:
        """What `worker` read at `read_version` (dcasgd); empty when not kept or not matching."""
        kept = self._read.get(worker)
        return kept[1] if kept is not None and kept[0] == read_version else {}

    # ------------------------------------------------------------------------------------------
    # Waiting (ssp bound, sync round, pause)

    def _may_pull(self, w: WorkerCounters) -> bool:
        if self.mode == "ssp":
            return w.clock <= self._min_clock(w) + self._bound
        if self.mode == "sync":
            return w.worker not in self._round
        return True

    def _min_clock(self, me: WorkerCounters) -> int:
        """Slowest clock among the active workers (unregistered ones count as 0)."""
        clocks = [
            self._workers[i].clock if i in self._workers else 0
            for i in range(self.num_workers)
            if i not in self._workers or self._workers[i].active
        ]
        return min(clocks, default=me.clock)

    def _note_clock_gap(self) -> None:
        """The largest clock gap between active registered workers so far. Caller holds the lock."""
        clocks = [w.clock for w in self._workers.values() if w.active]
        if len(clocks) > 1:
            self._max_clock_gap = max(self._max_clock_gap, max(clocks) - min(clocks))

    def _quorum(self) -> int:
        retired = sum(not w.active for w in self._workers.values())
        return max(1, self.num_workers - retired - self._backup)

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
            slots = {n: {**_copies(v.slots), **_copies(v.policy_state, POLICY_SLOT)} for n, v in self._vars.items()}
            return Snapshot(
                version=self.version,
                values={n: v.value.copy() for n, v in self._vars.items()},
                slots={n: s for n, s in slots.items() if s},
                updates={n: v.updates for n, v in self._vars.items()},
                last_seq={i: w.last_seq for i, w in self._workers.items()},
                clocks={i: w.clock for i, w in self._workers.items()},
                optimizer=self._opt.name,
            )

    def restore(self, snap: Snapshot) -> int:
        """Replaces the whole state with `snap` (initializing the shard if needed); the version."""
        if snap.optimizer and snap.optimizer != self._opt.name:
            raise FailedPrecondition(f"snapshot holds {snap.optimizer!r} slots, shard {self.index} runs {self._opt.name!r}")
        validate.check_initial_values(snap.values, self.frozen)
        self._check_snapshot_counters(snap)
        fresh = {name: self._new_variable(name, v) for name, v in sorted(snap.values.items())}
        for name, var in fresh.items():
            _fill_slots(name, var, snap.slots.get(name, {}), snap.updates.get(name, snap.version))
        with self._cond:
            if self._initialized:
                self._check_same_specs(snap.values, "Restore")
            self._vars, self._initialized, self.version = fresh, True, snap.version
            if self._log is not None:
                self._log.restore(self.version)
            for worker, seq in snap.last_seq.items():
                w = self._workers.setdefault(worker, WorkerCounters(worker))
                w.last_seq, w.clock = seq, snap.clocks.get(worker, 0)
                w.last_applied_seq = seq  # what the checkpoint's history may hold
            self._round.clear()
            self._read.clear()
            self._history.clear()  # the kept versions belong to the history before the restore
            self._milestones.clear()  # so do the evaluation milestones
            for ages in self._ages.values():
                ages.pending = None
            self._cond.notify_all()
            return self.version

    def _check_snapshot_counters(self, snap: Snapshot) -> None:
        """Restore: a version >= 0 and per-worker counters of workers of this cluster only."""
        if snap.version < 0:
            raise InvalidArgument(f"snapshot version {snap.version} is negative")
        for what, counters, low in (("last_seq", snap.last_seq, -1), ("clocks", snap.clocks, 0)):
            for worker, value in counters.items():
                if not 0 <= worker < self.num_workers or value < low:
                    raise InvalidArgument(f"snapshot {what}[{worker}] = {value}: worker outside [0, "
                                          f"{self.num_workers}) or count below {low}")

    def stats(self) -> dict:
        """Counters as a dict shaped like the StatsReply message."""
        with self._cond:
            workers = [{**_worker_stats(w), **(self._ages[i].stats() if i in self._ages else {})}
                       for i, w in sorted(self._workers.items())]
            return {
                "shard": self.index,
                "version": self.version,
                "workers": workers,
                "histogram": total_histogram(self._workers.values()),
                "rejected_unknown": self._rejected_unknown,
                "rounds": self._rounds,
                "paused": self._paused,
                "mode": self.mode,
                "initialized": self._initialized,
                "history_depth": self._history.depth,
                "history_bytes": self._history.nbytes,
                "max_clock_gap": self._max_clock_gap,
                "milestones_dropped": self._milestones_dropped,
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
        w = self._workers.get(worker)
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
            w = self._workers.get(worker)
            if w is not None:
                w.rejected += 1
            else:
                self._rejected_unknown += 1


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _copies(arrays: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: a.copy() for k, a in arrays.items()}


def _fill_slots(name: str, var: Variable, saved: Mapping[str, np.ndarray], updates: int) -> None:
    """Overwrites a fresh variable's slots and policy state with saved ones (same names, shapes)."""
    expected = set(var.slots) | {POLICY_SLOT + k for k in var.policy_state}
    if set(saved) != expected:
        raise FailedPrecondition(f"variable {name!r}: snapshot slots {sorted(saved)}, expected {sorted(expected)}")
    for key, array in saved.items():
        target = var.policy_state[key[len(POLICY_SLOT):]] if key.startswith(POLICY_SLOT) else var.slots[key]
        if target.shape != array.shape:
            raise FailedPrecondition(f"variable {name!r} slot {key!r}: shape {array.shape}, expected {target.shape}")
        target[...] = array
    var.updates = int(updates)


def _average(grads_by_worker: Iterable[Mapping]) -> dict:
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


def _worker_stats(w: WorkerCounters) -> dict:
    return {
        "worker": w.worker, "applied": w.applied, "dropped": w.dropped, "rejected": w.rejected,
        "duplicates": w.duplicates, "staleness_sum": w.staleness_sum, "staleness_max": w.staleness_max,
        "histogram": w.trimmed_histogram(), "last_seq": w.last_seq, "active": w.active,
        "reapplied": w.reapplied,
    }
