"""Recompute a cluster run in one process from its update log (see asyncps.update_log).

The run is rebuilt with the same code the cluster ran: one `Shard` per shard (optimizer,
schedule, staleness policy, frozen variables, consistency mode), the worker's model and
`GradientComputer`, the same data batches and dropout generators. Each shard applies the pushes
in its logged order; a gradient is computed once every shard has reached the version the worker
read from it, on exactly those weights (the shards' past versions are kept only while some
gradient still needs them, so memory is bounded by the staleness). The gradient's pieces travel
through the tensor codec as on the wire. Every replayed push must give the logged outcome and
version, else the replay stops and names the first divergence.

`without_staleness`: the same gradients (batches and generators), in the order shard 0 received
them, each computed on the current weights and applied at once on every shard (staleness 0; a
gradient the staleness policy dropped is applied too), as one worker would have trained.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asyncps.errors import UserError
from asyncps import update_log as ul

if TYPE_CHECKING:  # for the annotation only: load_run imports it when it reads a run
    from asyncps.config import Config

SUPPORTED_MODES = ("async", "ssp", "sync")


class ReplayError(UserError):
    """A run directory that cannot be replayed, or a replay that diverged from the log."""


@dataclass
class RunLog:
    """What a run directory holds for a replay."""

    run_dir: Path
    cfg: Config
    shards: list[np.ndarray]  # per shard: its log records (update_log.SHARD_FIELDS)
    steps: dict  # (worker, seq) -> update_log.Step
    final_versions: list[int] | None  # report.json's `versions`


def load_run(run_dir) -> RunLog:
    """Reads config, logs and report of a cluster run; refuses what replay cannot reproduce."""
    from asyncps.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ReplayError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_config(run_dir / "config.yaml")
    folder = ul.log_dir(run_dir)
    if cfg.cluster.mode not in SUPPORTED_MODES:
        raise ReplayError(f"{run_dir}: cluster.mode {cfg.cluster.mode!r} cannot be replayed (supported: {SUPPORTED_MODES})")
    missing = [i for i in range(cfg.cluster.ps) if not (folder / f"ps{i}.log").is_file()]
    if missing:
        raise ReplayError(f"{run_dir}: no update log ({folder / f'ps{missing[0]}.log'} is missing); only runs of "
                          f"`asyncps launch` with run_dir= and cluster.update_log: true record one")
    if list(folder.glob("ps*.restart*.log")):
        raise ReplayError(f"{run_dir}: a shard was restarted during the run (restored from a checkpoint): not replayable")
    try:
        shards = [ul.read_log(folder / f"ps{i}.log")[1] for i in range(cfg.cluster.ps)]
        steps = ul.read_worker_logs(folder)
    except ul.LogError as err:
        raise ReplayError(str(err)) from None
    for i, records in enumerate(shards):
        if (records["kind"] == ul.RESTORE).any():
            raise ReplayError(f"{run_dir}: shard {i} was restored from a checkpoint during the run: not replayable")
    report = run_dir / "report.json"
    final = None
    if report.is_file():
        import json

        final = json.loads(report.read_text()).get("versions")
    ends = [int(records["version"][-1]) if len(records) else 0 for records in shards]
    if final is not None and ends != list(final):
        raise ReplayError(f"{run_dir}: the shard logs end at versions {ends}, report.json says {final} (a log was "
                          f"cut short: a process killed before it flushed?)")
    return RunLog(run_dir, cfg, shards, steps, final)


class Replayer:
    """The run's model, data and fresh shards, initialized as the chief initialized them."""

    def __init__(self, cfg, steps: dict, mode: str | None = None):
        import copy

        from asyncps.ps.shard import Shard
        from asyncps.worker.data import BatchStream, load_dataset
        from asyncps.worker.models import build_model
        from asyncps.worker.step import GradientComputer
        from asyncps.worker.variables import initial_params, placement_for, trainable_names

        self.cfg = cfg
        self.data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
        self.model = build_model(cfg.model, self.data.meta)
        id_tables = getattr(self.model, "id_tables", None)
        if id_tables:  # the update log orders pushes; it keeps no rows
            raise ReplayError(f"model {cfg.model.name} has id-keyed tables ({sorted(id_tables)}): "
                              "`asyncps replay` recomputes dense variables only (docs/sparse.md)")
        params0 = initial_params(cfg, self.model)
        self.placement = placement_for(params0, cfg.cluster.ps)
        self.compute = GradientComputer(self.model, trainable_names(params0, cfg.train.frozen), cfg.train.graph_mode)
        shard_cfg = copy.deepcopy(cfg)
        shard_cfg.cluster.mode = mode or cfg.cluster.mode
        self.shards = [Shard(shard_cfg, i) for i in range(cfg.cluster.ps)]
        for shard, piece in zip(self.shards, self.placement.split(params0)):
            shard.init(_through_wire(piece))
        self._streams: dict[tuple, BatchStream] = {}
        self._stream_class = BatchStream
        self._compression = getattr(cfg.cluster, "compression", "none")
        self._compressors: dict[int, tuple] = {}  # worker -> (its last step compressed, compressor)
        self._previous = _previous_steps(steps)

    def gradient(self, step: ul.Step, params: dict) -> list[dict]:
        """The worker's gradient of `step` on `params`, cut per shard as it travelled."""
        key = (step.data_shard, step.num_data_shards, step.seed)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self._stream_class(
                len(self.data.x_train), self.cfg.train.batch_size, *key)
        indices = stream.at(step.batch)
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = step.rng_state
        _, grads = self.compute(params, self.data.x_train[indices], self.data.y_train[indices], rng)
        if self._compression != "none":
            grads = self._compress(step, grads)
        return [_through_wire(piece) for piece in self.placement.split(grads)]

    def _compress(self, step: ul.Step, grads: dict) -> dict:
        """cluster.compression: the worker's error feedback, whose residual carries over from the
        worker's previous gradient, so a worker's gradients must come in the order it pushed them."""
        from asyncps.compression import make_compressor

        last, compressor = self._compressors.get(step.worker, (None, None))
        previous = self._previous.get((step.worker, step.seq))
        if previous is None:  # the first gradient of a worker process: a fresh residual
            compressor = make_compressor(self._compression)
        elif last != previous:
            raise ReplayError(f"compression: worker {step.worker} seq {step.seq} needs the residual after seq "
                              f"{previous[1]}, which was never applied (a failed push): not replayable")
        self._compressors[step.worker] = ((step.worker, step.seq), compressor)
        return compressor(grads)

    def values(self, shard: int) -> dict:
        return self.shards[shard].pull(None)[1]

    def params(self) -> dict:
        return self.placement.join([self.values(s) for s in range(len(self.shards))])


def _previous_steps(steps: dict) -> dict:
    """(worker, seq) -> the key of the same worker process's previous logged step (None: first)."""
    previous: dict[tuple[int, int], tuple[int, int] | None] = {}
    last: dict[int, tuple[int, int]] = {}  # worker -> its latest key so far
    for key in sorted(steps):
        step = steps[key]
        before = last.get(step.worker)
        previous[key] = before if before is not None and steps[before].process == step.process else None
        last[step.worker] = key
    return previous


def _through_wire(piece: dict) -> dict:
    """`piece` encoded and decoded by the tensor codec, as a push or an Init travels."""
    from asyncps.protos import codec

    asm = codec.Assembler()
    asm.add_wire(codec.encode_message(piece, None))
    return asm.finish()


@dataclass
class Outcome:
    """What a replay produced."""

    params: dict
    pushes: int = 0
    gradients: int = 0
    staleness: Counter = field(default_factory=Counter)
    max_history: int = 0  # most past shard versions held at once


def replay(run: RunLog) -> Outcome:
    """Replays every shard's log in order (see the module docstring); the final weights."""
    rp = Replayer(run.cfg, run.steps)
    referenced = Counter((int(r["worker"]), int(r["seq"])) for log in run.shards for r in log if r["kind"] == ul.PUSH)
    need: Counter[tuple[int, int]] = Counter()  # (shard, version) -> pending uses of that past version
    for key in referenced:
        step = run.steps.get(key)
        if step is None:
            raise ReplayError(f"{run.run_dir}: no worker log entry for worker {key[0]} seq {key[1]} (log incomplete)")
        need.update((s, v) for s, v in enumerate(step.versions))
    for s, log in enumerate(run.shards):
        need.update((s, int(r["read_version"])) for r in log if r["kind"] == ul.PUSH and r["had_read"])
    state = _State(rp, run, referenced, need)
    state.run()
    _check_final(run, rp)
    return Outcome(rp.params(), state.pushes, state.computed, state.staleness, state.max_history)


class _State:
    """The bookkeeping of one replay: log positions, kept versions, gradients not yet used up."""

    def __init__(self, rp: Replayer, run: RunLog, uses: Counter, need: Counter):
        self.rp, self.log, self.uses, self.need = rp, run, uses, need
        self.pos = [0] * len(run.shards)
        self.history: dict[tuple[int, int], dict] = {}
        self.grads: dict[tuple[int, int], list[dict]] = {}
        self.pushes = self.computed = self.max_history = 0
        self.staleness: Counter = Counter()
        for s in range(len(run.shards)):
            self._remember(s)

    def run(self) -> None:
        while any(p < len(log) for p, log in zip(self.pos, self.log.shards)):
            if not any([self._advance(s) for s in range(len(self.log.shards))]):
                s = next(i for i, log in enumerate(self.log.shards) if self.pos[i] < len(log))
                raise ReplayError(f"{self.log.run_dir}: the logs are inconsistent: shard {s} entry {self.pos[s]} waits "
                                  f"for a version no shard reaches (a log cut short?)")

    def _advance(self, s: int) -> bool:
        """Applies shard `s`'s next entries while their gradients can be computed; True if any."""
        log, moved = self.log.shards[s], False
        while self.pos[s] < len(log):
            r = log[self.pos[s]]
            worker = int(r["worker"])
            if r["kind"] in (ul.REGISTER, ul.RETIRE):
                self.rp.shards[s].register_worker(worker, retire=bool(r["kind"] == ul.RETIRE))
            elif not self._push(s, r):
                return moved
            self.pos[s] += 1
            self._remember(s)
            moved = True
        return moved

    def _push(self, s: int, r) -> bool:
        key, read = (int(r["worker"]), int(r["seq"])), int(r["read_version"])
        if key not in self.grads and not self._compute(key):
            return False
        shard = self.rp.shards[s]
        if r["had_read"]:  # delay compensation: what the worker's last pull left on the shard
            shard.values_read.remember(key[0], read, self.history[s, read])
            self._release(s, read)
        else:
            shard.values_read.forget(key[0])
        result = shard.push(key[0], key[1], read, self.grads[key][s])
        if result.result != ul.RESULT_NAMES.get(int(r["result"])) or shard.version != int(r["version"]):
            raise ReplayError(f"{self.log.run_dir}: replay diverged at shard {s} entry {self.pos[s]} (worker {key[0]} "
                              f"seq {key[1]}): {result.result} at version {shard.version}, the log says "
                              f"{ul.RESULT_NAMES.get(int(r['result']))} at version {int(r['version'])}")
        self.pushes += 1
        if result.result == "APPLIED" and shard.mode != "sync":
            self.staleness[result.staleness] += 1
        self.uses[key] -= 1
        if not self.uses[key]:
            del self.grads[key]
        return True

    def _compute(self, key) -> bool:
        step = self.log.steps[key]
        if not all((s, v) in self.history for s, v in enumerate(step.versions)):
            return False  # a shard has not reached the version this gradient read
        params = self.rp.placement.join([self.history[s, v] for s, v in enumerate(step.versions)])
        self.grads[key] = self.rp.gradient(step, params)
        self.computed += 1
        for s, v in enumerate(step.versions):
            self._release(s, v)
        return True

    def _remember(self, s: int) -> None:
        v = self.rp.shards[s].version
        if self.need[s, v] > 0 and (s, v) not in self.history:
            self.history[s, v] = self.rp.values(s)
            self.max_history = max(self.max_history, len(self.history))

    def _release(self, s: int, v: int) -> None:
        self.need[s, v] -= 1
        if self.need[s, v] <= 0:
            self.history.pop((s, v), None)


def _check_final(run: RunLog, rp: Replayer) -> None:
    versions = [shard.version for shard in rp.shards]
    if run.final_versions is not None and list(run.final_versions) != versions:
        raise ReplayError(f"{run.run_dir}: the logs end at versions {versions}, report.json says "
                          f"{run.final_versions} (a log was cut short: a process killed before it flushed?)")


def replay_without_staleness(run: RunLog) -> Outcome:
    """The counterfactual: the same gradients in shard 0's order, each on the current weights."""
    if run.cfg.cluster.mode == "sync":
        raise ReplayError(f"{run.run_dir}: a sync run has no staleness to take away (replay it without the flag)")
    rp = Replayer(run.cfg, run.steps, mode="async")
    order = [(int(r["worker"]), int(r["seq"])) for r in run.shards[0] if r["kind"] == ul.PUSH]
    for worker in sorted({w for w, _ in order}):
        for shard in rp.shards:
            shard.register_worker(worker)
    out = Outcome(params={})
    for worker, seq in order:
        step = run.steps.get((worker, seq))
        if step is None:
            raise ReplayError(f"{run.run_dir}: no worker log entry for worker {worker} seq {seq} (log incomplete)")
        pieces = rp.gradient(step, rp.params())
        for shard, piece in zip(rp.shards, pieces):
            result = shard.push(worker, seq, shard.version, piece)
            out.staleness[result.staleness] += result.result == "APPLIED"
            out.pushes += 1
        out.gradients += 1
    out.params = rp.params()
    return out
