"""Staleness at any worker count, in one process: an exact event simulation of an M-worker cluster
(`staleness.simulate`) and W workers per clock of controlled staleness (`staleness.workers`).

Why here (asyncps.cli): the simulation runs the worker's side (models, data shards, the delay
distributions) and the shard's side (optimizers, schedules, staleness policies) in one loop, and
reuses `asyncps train`'s loop and its `ControlledStaleness.apply`. The import direction of the
project (DESIGN.md: chief -> worker -> protos, ps -> protos) lets only the command-line layer
import both worker and ps, as cli/train.py does; it is not a role of its own.

Both classes are "steppers" of `asyncps.cli.train.train`: `step(params, step)` applies exactly
one version (one update of the weights) and returns a loss; train's loop does the rest (logging,
evaluation, targets, report.json). `summary()` is report.json's `staleness` section.

The simulation (`Simulation`)
-----------------------------
M virtual workers. Worker i reads its data exactly as cluster worker i would (the batches of
`BatchStream(n, batch, i, M, seed)`, dropout RNG seeded ``[seed, i, 0]``) and its compute times
come from `staleness.simulate.compute` (a `delay:`-style distribution, `asyncps.worker.distributions`),
drawn from the stream launch's worker i draws its injected delays from; `simulate.straggler`
stretches them as `delay.straggler` does. Virtual time only: nothing sleeps.

A read takes the current version. The gradient depends only on the weights read and the batch,
so it is computed AT READ TIME and kept until the worker's arrival, when it is applied: no
copy of the weights is needed (a copy of the trainable weights read is kept only for the DC-ASGD
policies, which need them at apply). Arrivals are processed in the order of a heap keyed by
(virtual time, read order, worker): ties go to the worker that read first, so M workers with
equal compute times take turns. A worker reads again as soon as its arrival is processed,
subject to the mode:

- ``async``: applied on arrival, through the staleness policy, like a shard's push.
- ``ssp``: as async, but a worker whose clock (its pushes) would be more than ``staleness_bound``
  ahead of the slowest worker's waits; it reads when the slowest worker's arrival releases it.
- ``sync``: a round collects gradients read at the current version; the first
  ``workers - backup_workers`` are averaged and applied once (staleness 0); the workers of the
  round then read the new version. A gradient read at an older version arrives late: dropped
  and counted, and its worker reads the current version. (What the shard does.)
- ``softsync`` (n-softsync, Zhang et al. IJCAI 2016): every c = workers // n arrivals are
  averaged and applied as one update; nobody waits. Each gradient's staleness is the version
  when its group is applied minus the version it read; the staleness policy adjusts each
  gradient before the average (``lr_scale``: gradient i weighted alpha / tau_i, the paper's
  per-gradient rate, exact for SGD; for momentum or Adam the weight scales the gradient, not
  the rate). c = 1 is async.

The staleness recorded for every applied gradient is (version when applied) - (version read),
as the shards record it. A version is one applied update (one round in sync, one group in
softsync), and `train.max_steps` counts versions, as on the shards.

W workers per clock (`ClockedStaleness`, Dai et al. ICLR 2019)
-------------------------------------------------------------
`staleness: {controlled: true, workers: W, combine: sum|mean}`: in clock c each worker p draws r_p
from `staleness.distribution` (its own seeded stream: worker 0's is `train`'s) and computes a
gradient on its own next batch, on the weights at the end of clock c - r_p (clamped to version 0
before clock r_p, as train clamps); the W gradients, each through the staleness policy with
staleness r_p, are summed (or averaged) and applied as one update.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import replace

import numpy as np

from asyncps.histogram import summarize


def make_stepper(cfg, data, compute, optimizer, schedule, params, slots, trainable):
    """The stepper for train's loop, or None for plain and single-stream controlled training."""
    st = cfg.staleness
    if st.simulate is not None:
        return Simulation(cfg, data, compute, optimizer, schedule, params, slots, trainable)
    if st.controlled and st.workers > 1:
        return ClockedStaleness(cfg, data, compute, optimizer, schedule, params, slots, trainable)
    return None


class _Updater:
    """The shard's update rule for one or several gradients: the staleness policy, the optimizer,
    the schedule. A single gradient goes through train's `ControlledStaleness.apply` (exactly what
    train and the shards do); several are combined here."""

    def __init__(self, cfg, optimizer, schedule, params, slots, trainable):
        from asyncps.cli.train import ControlledStaleness

        plain = replace(cfg, staleness=replace(cfg.staleness, controlled=False, simulate=None, workers=1))
        self.single = ControlledStaleness(plain, params, trainable)  # s_max 0: keeps no versions
        self.policy, self.policy_state = self.single.policy, self.single.policy_state
        self.optimizer, self.schedule, self.slots = optimizer, schedule, slots
        self.trainable = list(trainable)
        self.dropped = 0  # gradients dropped by the staleness policy

    def apply_one(self, params, grads, read, staleness: int, version: int) -> bool:
        applied = self.single.apply(self.optimizer, params, self.slots, grads, read, staleness,
                                    self.schedule(version), version)
        self.dropped += not applied
        return applied

    def apply_many(self, params, items, version: int, mean: bool = True, adjust_first: bool = True) -> list[bool]:
        """One update from several gradients: `items` are (grads, staleness, read weights or None).

        adjust_first: each gradient goes through the policy with its own staleness, then they
        are combined (summed or averaged over the gradients kept); else they are averaged first
        and the average goes through the policy at staleness 0 (a sync round, as the shard).
        Returns, per item, whether the update holds (some of) it."""
        lr = self.schedule(version)
        kept = [False] * len(items)
        for name in self.trainable:
            total, count = None, 0
            if adjust_first:
                for i, (grads, staleness, read) in enumerate(items):
                    if name not in grads:
                        continue
                    g = _dense(grads[name], params[name])
                    adjusted = self.policy.adjust(g, staleness, params[name],
                                                  None if read is None else read[name], self.policy_state[name])
                    if adjusted.grad is None:
                        continue
                    kept[i] = True
                    part = adjusted.grad if adjusted.lr_scale == 1.0 else adjusted.grad * np.float32(adjusted.lr_scale)
                    total = part.astype(np.float32, copy=True) if total is None else np.add(total, part, out=total)
                    count += 1
                if total is None:
                    continue
                if mean and count > 1:
                    total /= np.float32(count)
            else:
                parts = [_dense(grads[name], params[name]) for grads, _, _ in items if name in grads]
                if not parts:
                    continue
                kept = [kept[i] or name in grads for i, (grads, _, _) in enumerate(items)]
                total = parts[0].astype(np.float32, copy=True)
                for part in parts[1:]:
                    total += part
                count = len(parts)
                if count > 1:
                    total /= np.float32(count)
                adjusted = self.policy.adjust(total, 0, params[name], None, self.policy_state[name])
                if adjusted.grad is None:
                    continue
                total = adjusted.grad
            self.optimizer.apply_dense(params[name], total, self.slots[name], lr, version)
        self.dropped += kept.count(False)
        return kept


def _dense(grad, value: np.ndarray) -> np.ndarray:
    """A gradient as a dense array shaped like `value` (sparse rows scattered into zeros)."""
    if hasattr(grad, "rows"):
        dense = np.zeros_like(value, dtype=np.float32)
        np.add.at(dense, grad.rows, grad.values)
        return dense
    return grad


def _own(grads: dict, graph_mode: bool) -> dict:
    """Gradients that stay valid after the next call of the GradientComputer (graph mode reuses
    its output buffers)."""
    if not graph_mode:
        return grads
    return {k: (v if hasattr(v, "rows") else v.copy()) for k, v in grads.items()}


class _Workers:
    """The data side of M (or W) virtual workers: each its cluster shard of the data, its RNG."""

    def __init__(self, cfg, data, compute, count: int):
        from asyncps.worker.data import BatchStream

        self.data, self.compute, self.graph_mode = data, compute, cfg.train.graph_mode
        n = len(data.x_train)
        self.streams = [BatchStream(n, cfg.train.batch_size, i, count, cfg.seed) for i in range(count)]
        self.rngs = [np.random.default_rng([cfg.seed, i, 0]) for i in range(count)]

    def gradient(self, i: int, weights: dict) -> tuple[float, dict]:
        indices, _ = next(self.streams[i])
        loss, grads = self.compute(weights, self.data.x_train[indices], self.data.y_train[indices], self.rngs[i])
        return float(loss), _own(grads, self.graph_mode)


class Simulation:
    """The event simulation of `staleness.simulate` (see the module docstring)."""

    def __init__(self, cfg, data, compute, optimizer, schedule, params, slots, trainable):
        from asyncps.worker.delays import DelayModel

        sim = cfg.staleness.simulate
        self.sim, self.m, self.mode = sim, sim.workers, sim.mode
        self.trainable = list(trainable)
        self.workers = _Workers(cfg, data, compute, self.m)
        self.update = _Updater(cfg, optimizer, schedule, params, slots, trainable)
        self.keep_read = self.update.policy.needs_value_read
        times = replace(sim.compute, straggler=sim.straggler)
        self.delays = [DelayModel(times, i, cfg.seed) for i in range(self.m)]
        self.quorum = self.m - sim.backup_workers
        self.group = max(1, self.m // sim.n)  # softsync: c
        self.version = 0
        self.now = 0.0
        self.order = 0  # reads so far: the heap's tie-break
        self.heap: list[tuple[float, int, int]] = []
        self.read_version = [0] * self.m
        self.grads: list[dict | None] = [None] * self.m
        self.losses = [0.0] * self.m
        self.reads: list[dict | None] = [None] * self.m
        self.clock = [0] * self.m  # pushes processed per worker (ssp)
        self.steps = [0] * self.m  # reads per worker (the straggler's pause counts them)
        self.waiting: list[int] = []  # ssp: workers held at their read
        self.pending: list[int] = []  # sync: the pending round, in arrival order
        self.group_items: list[tuple] = []  # softsync: (worker, grads, read, read version, loss)
        self.hist: dict[int, int] = {}
        self.per_worker: list[dict[int, int]] = [{} for _ in range(self.m)]  # staleness histograms
        self.late = 0  # sync: gradients of a finished round
        self.computed = 0
        self.max_clock_gap = 0
        self._params = params
        for i in range(self.m):
            self._read(i)

    # -- events ---------------------------------------------------------------------------------

    def _read(self, i: int) -> None:
        params = self._params
        self.read_version[i] = self.version
        self.losses[i], self.grads[i] = self.workers.gradient(i, params)
        self.computed += 1
        if self.keep_read:
            self.reads[i] = {**params, **{n: params[n].copy() for n in self.trainable}}
        seconds = self.delays[i].seconds(self.steps[i])
        self.steps[i] += 1
        heapq.heappush(self.heap, (self.now + seconds, self.order, i))
        self.order += 1

    def _record(self, i: int, staleness: int) -> None:
        self.hist[staleness] = self.hist.get(staleness, 0) + 1
        h = self.per_worker[i]
        h[staleness] = h.get(staleness, 0) + 1

    def step(self, params: dict, step: int) -> float:
        """Processes arrivals until one version is applied; returns its mean loss."""
        self._params = params
        start = self.version
        guard = 0
        while self.version == start:
            if not self.heap:
                raise RuntimeError("simulation: no worker left to arrive (a bug)")
            self.now, _, i = heapq.heappop(self.heap)
            loss = getattr(self, f"_arrive_{self.mode}")(i, params)
            guard += 1
            if guard > 1000 * self.m + 100_000:
                raise RuntimeError("simulation: no update applied in a long time (every gradient dropped?)")
        return loss

    def _arrive_async(self, i: int, params: dict) -> float:
        staleness = self.version - self.read_version[i]
        if self.update.apply_one(params, self.grads[i], self.reads[i] or params, staleness, self.version):
            self._record(i, staleness)
            self.version += 1
        self.clock[i] += 1
        loss = self.losses[i]
        self.grads[i] = self.reads[i] = None
        if self.mode == "ssp":
            self._release(i)
        else:
            self._read(i)
        return loss

    _arrive_ssp = _arrive_async

    def _release(self, arrived: int) -> None:
        """ssp: the arrived worker reads if the bound allows, and so does every waiting worker
        the arrival released (in worker order)."""
        bound = self.sim.staleness_bound
        low = min(self.clock)
        self.max_clock_gap = max(self.max_clock_gap, max(self.clock) - low)
        candidates = sorted(self.waiting + [arrived])
        self.waiting = []
        for j in candidates:
            if self.clock[j] <= low + bound:
                self._read(j)
            else:
                self.waiting.append(j)

    def _arrive_sync(self, i: int, params: dict) -> float:
        self.clock[i] += 1
        if self.read_version[i] < self.version:  # a finished round's gradient
            self.late += 1
            self.grads[i] = self.reads[i] = None
            self._read(i)
            return self.losses[i]
        self.pending.append(i)
        if len(self.pending) < self.quorum:
            return self.losses[i]
        items = [(self.grads[j], 0, None) for j in self.pending]
        self.update.apply_many(params, items, self.version, mean=True, adjust_first=False)
        loss = float(np.mean([self.losses[j] for j in self.pending]))
        for j in self.pending:
            self._record(j, 0)
        self.version += 1
        done, self.pending = self.pending, []
        for j in done:
            self.grads[j] = self.reads[j] = None
            self._read(j)
        return loss

    def _arrive_softsync(self, i: int, params: dict) -> float:
        """n-softsync: the gradient joins the group; the c-th applies the group. The worker then
        pulls at once: the version after the update if its gradient completed the group."""
        self.clock[i] += 1
        self.group_items.append((i, self.grads[i], self.reads[i], self.read_version[i], self.losses[i]))
        self.grads[i] = self.reads[i] = None
        if len(self.group_items) < self.group:
            self._read(i)
            return self.group_items[-1][4]
        group, self.group_items = self.group_items, []
        if self.group == 1:  # 1 gradient per update: async, through the single-gradient path
            j, grads, read, rv, loss = group[0]
            staleness = self.version - rv
            if self.update.apply_one(params, grads, read or params, staleness, self.version):
                self._record(j, staleness)
                self.version += 1
            self._read(i)
            return loss
        items = [(g, self.version - rv, r) for _, g, r, rv, _ in group]
        kept = self.update.apply_many(params, items, self.version, mean=True, adjust_first=True)
        if any(kept):
            for (j, _, _, rv, _), ok in zip(group, kept):
                if ok:
                    self._record(j, self.version - rv)
            self.version += 1
        self._read(i)
        return float(np.mean([x[4] for x in group]))

    def summary(self) -> dict:
        out = summarize(self.hist)
        out["dropped"] = self.update.dropped
        out["simulation"] = {
            "workers": self.m,
            "mode": self.mode,
            "virtual_seconds": self.now,
            "versions": self.version,
            "gradients_computed": self.computed,
            "late_dropped": self.late,
            "softsync_c": self.group if self.mode == "softsync" else None,
            "max_clock_gap": self.max_clock_gap if self.mode == "ssp" else None,
            "per_worker": {str(i): summarize(h) for i, h in enumerate(self.per_worker)} if self.m <= 64 else None,
        }
        return out


class ClockedStaleness:
    """W workers per clock, controlled staleness (Dai et al.; see the module docstring)."""

    def __init__(self, cfg, data, compute, optimizer, schedule, params, slots, trainable):
        from asyncps.worker.delays import StalenessSampler

        st = cfg.staleness
        self.w, self.mean = st.workers, st.combine == "mean"
        self.trainable = list(trainable)
        self.samplers = [StalenessSampler(st, cfg.seed, p) for p in range(self.w)]
        self.s_max = self.samplers[0].s_max
        self.workers = _Workers(cfg, data, compute, self.w)
        self.update = _Updater(cfg, optimizer, schedule, params, slots, trainable)
        self.past: deque[dict] = deque(maxlen=self.s_max)  # ends of clocks c - s_max .. c - 1
        self.hist: dict[int, int] = {}
        self.requested: dict[int, int] = {}
        self.clamped = 0

    def step(self, params: dict, step: int) -> float:
        items, losses = [], []
        for p in range(self.w):
            want = self.samplers[p].draw()
            self.requested[want] = self.requested.get(want, 0) + 1
            r = min(want, len(self.past))
            self.clamped += r < want
            read = params if r == 0 else {**params, **self.past[-r]}
            loss, grads = self.workers.gradient(p, read)
            items.append((grads, r, read))
            losses.append(loss)
            self.hist[r] = self.hist.get(r, 0) + 1
        if self.s_max:
            self.past.append({n: params[n].copy() for n in self.trainable})
        self.update.apply_many(params, items, step, mean=self.mean, adjust_first=True)
        return float(np.mean(losses))

    def summary(self) -> dict:
        out = summarize(self.hist)
        out["served"] = summarize(self.hist)
        out["requested"] = summarize(self.requested)
        out["clamped"] = self.clamped
        out["distribution_mean"] = self.samplers[0].mean
        out["dropped"] = self.update.dropped
        out["workers_per_clock"] = self.w
        out["combine"] = "mean" if self.mean else "sum"
        return out
