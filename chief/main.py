"""The chief process: it owns time. It initializes (or restores) the shards, hands out worker
indices, watches progress, evaluates on held-out data, takes checkpoints, repairs the model
when a shard dies, decides when to stop, and writes the run's report.

Start: the shards are given their variables BEFORE the chief serves, so no worker can register
and pull from an empty shard: `init` for a new run; with `checkpoint.resume`, a restore of every
shard from the checkpoint (or, when every shard still holds its variables, as after a restart of
the chief alone, the shards' state is adopted as it is: it is newer than any checkpoint).

A shard that comes back empty (restarted after a crash, `StatsReply.initialized` false) makes
the chief pause every shard, restore EVERY shard from the latest valid checkpoint (so the model
stays consistent), and resume; the failure and the steps lost are recorded (docs/failures.md).

Stopping is ordered so the final model is exact: raise the stop flag (workers see it in their
next heartbeat), pause every shard (no push applies after that), pull and score the final
weights, write the final checkpoint, collect the shards' counters, wait for every live worker
to have seen the flag, stop the shards.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import grpc
import yaml

from asyncps.atomic import atomic_write_bytes
from asyncps.chief import checkpoint as ckpt
from asyncps.chief.checkpointer import Checkpointer
from asyncps.chief.membership import Membership
from asyncps.chief.report import cluster_report, merged_histogram, row_staleness_means
from asyncps.chief.servicer import SERVICE_NAME, ChiefServicer
from asyncps.chief.telemetry import RunTelemetry
from asyncps.cluster import ClusterSpec, bind_host
from asyncps.config import Config
from asyncps.errors import UserError
from asyncps.histogram import summarize
from asyncps.protos import chief_pb2_grpc
from asyncps.protos.serving import RoleServer
from asyncps.ps_client import PSClient
from asyncps.runs import (
    PARAMS_FILE,
    MetricsLog,
    Progress,
    TargetTracker,
    read_metrics,
    resolve_run_dir,
    save_params,
    write_report,
)
from asyncps.worker.data import load_dataset
from asyncps.worker.main import FINAL_REPORT_KEY, id_tables_of
from asyncps.worker.models import build_model
from asyncps.worker.variables import initial_params, placement_for

logger = logging.getLogger(__name__)
STOP_FILE = "STOP"  # created in the run directory: the run stops, evaluates and reports, exit 0
POLL_SECONDS = 0.05  # the chief's view of the global step lags by at most this (time to target included)
STATS_ATTEMPTS = 3  # rpc_timeout-long waits for an unreachable shard before the run is given up


class RunFailed(UserError):
    """The run cannot go on (a shard lost its state and there is no checkpoint, a shard is gone)."""


def run_chief(cfg: Config, spec: ClusterSpec) -> int:
    """Runs the chief until the run is over; returns the process exit code."""
    run = ChiefRun(cfg, spec)
    try:
        run.start()
        run.train()
        run.finish()
    finally:
        run.close()
    return 0


def global_step(versions: list[int] | None) -> int:
    """Updates applied by every shard: each push (a sync round) bumps each shard's version once;
    0 when no versions are known (an evaluation of given params without them)."""
    return min(versions) if versions else 0


class ChiefRun:
    """One run as the chief sees it; see the module docstring for the order of events."""

    def __init__(self, cfg: Config, spec: ClusterSpec):

        self.cfg, self.spec = cfg, spec
        self.run_dir = resolve_run_dir(cfg)
        write_config_once(self.run_dir, cfg)  # compose and TFJob runs: replay, eval and inspect need it
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier run of this directory
        self.previous = previous_incarnation(self.run_dir / "metrics.jsonl")
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", hold=True)  # times count from step 0 (start())
        self.telemetry = RunTelemetry(cfg, self.run_dir, self.log, notice=lambda m: logger.info(f"chief: {m}"))
        self.last_stats = None
        self.last_eval: dict[str, float] = {}
        self.data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
        self.model = build_model(cfg.model, self.data.meta)
        self.params0 = initial_params(cfg, self.model)
        self.placement = placement_for(self.params0, len(spec.ps))
        self.tables = id_tables_of(self.model, cfg)  # id-keyed tables: rows by id (docs/sparse.md)
        self.ps = PSClient(list(spec.ps), self.placement, cfg.cluster, tables=self.tables)
        self.checkpoints = Checkpointer(cfg, self.run_dir, self.ps, self.placement, self.log)
        self.stop = threading.Event()
        self.started = threading.Event()  # the start barrier has passed (workers train)
        self.step = 0
        self.process_start = self.start_time = time.time()
        self.carried_seconds = 0.0  # training time of earlier incarnations (resume, adoption)
        self.startup_seconds: float | None = None
        self.membership = Membership(spec.workers, cfg.cluster.heartbeat_timeout, on_event=self._member_event,
                                     stopping=self.stop.is_set)
        self.server = self._make_server()
        self.target = TargetTracker(cfg.train.target)
        self.events: list[dict] = []
        self.failures: list[dict] = []
        self.resumed_from: int | None = None
        self.adopted = False  # a restarted chief took the live shards over
        self.final_reports: set[int] = set()  # workers whose last metrics arrived after the stop
        self._eval_histogram: dict[int, int] = {}

    def _make_server(self) -> RoleServer:
        host, port = self.spec.chief.rsplit(":", 1)
        server = RoleServer("chief", bind_host(host), int(port), (SERVICE_NAME,),
                            max_workers=max(8, 2 * self.spec.workers + 4), security=self.cfg.cluster.security)
        servicer = ChiefServicer(self.membership, self.stop, list(self.spec.ps), self.cfg.seed,
                                 lambda: self.step, self._worker_metrics, started=self.started)
        chief_pb2_grpc.add_ChiefServicer_to_server(servicer, server.server)
        return server

    def _member_event(self, kind: str, member) -> None:
        row = self.log.write(kind, self.step, worker=member.index, hostname=member.hostname, pid=member.pid)
        self.events.append(row)
        logger.info(f"chief: {kind} worker {member.index} ({member.hostname}:{member.pid}) at step {self.step}")
        if kind == "worker_dead":  # its in-flight gradient is lost, nothing else
            self._record_failure("worker", member.index, self.step, self.step)

    def _worker_metrics(self, report) -> None:
        values = dict(report.values)
        if values.pop(FINAL_REPORT_KEY, None):
            self.final_reports.add(report.worker_index)
        values = self.telemetry.worker_report(report.worker_index, values)
        self.log.write("worker", self.step, worker=report.worker_index, worker_step=report.step, **values)

    # ------------------------------------------------------------------------------------------
    # Start

    def start(self) -> None:
        """Give every shard its variables (init, restore or adopt), then serve the Chief service."""
        self._prepare_shards()
        self.telemetry.serve_metrics(self, notice=logger.info)
        port = self.server.start()
        logger.info(f"chief: serving on {self.spec.chief.rsplit(':', 1)[0]}:{port}; run_dir {self.run_dir}")
        ready = self._start_barrier()
        self.startup_seconds = time.time() - self.process_start
        self.start_time = time.time() - self.carried_seconds  # the run's one zero point
        self.log.release(self.start_time)
        self.started.set()
        self.telemetry.baseline(self.step, self.ps.stats())
        self.log.write("start", self.step, workers=self.spec.workers, shards=len(self.spec.ps), mode=self.cfg.cluster.mode,
                       pid=os.getpid(), resumed_from=self.resumed_from, workers_ready=ready,
                       startup_seconds=round(self.startup_seconds, 3))

    def _start_barrier(self) -> int | None:
        """Step 0: waits until every worker has registered and loaded its data (at most
        `cluster.start_timeout` s; then the ready ones start, with a notice). Returns how many
        were ready; None when there is no barrier (off, or the workers already train)."""
        c = self.cfg.cluster
        if not c.start_barrier or self.adopted:
            return None
        deadline = time.monotonic() + c.start_timeout
        while True:
            ready = sum(m.ready for m in self.membership.alive())
            if ready >= self.spec.workers or self.stop.is_set():
                return ready
            if time.monotonic() >= deadline:
                message = (f"{ready} of {self.spec.workers} workers ready after {c.start_timeout:g} s "
                           f"(cluster.start_timeout); starting with them")
                logger.warning(f"chief: start barrier: {message}")
                self.log.write("start_barrier", self.step, message=message, ready=ready)
                return ready
            self.membership.reap()
            time.sleep(0.02)

    def _prepare_shards(self) -> None:
        resume = self.cfg.checkpoint.resume
        stats = self.ps.stats()  # waits for the shards to come up
        if resume and all(s.initialized for s in stats):
            self.step = global_step([s.version for s in stats])
            self.ps.resume()  # the previous chief may have died with the shards paused (mid-checkpoint)
            self.adopted = True  # the workers are training: no start barrier
            self.carried_seconds = self.previous["time"]
            logger.info(f"chief: every shard still holds its variables; continuing from step {self.step}")
            self._carry_over_failures(self.step)
        elif resume:
            self._resume(ckpt.resolve(resume, self.checkpoints.folder, warn=self._warn))
        else:
            self.ps.init(self.params0)
        self.checkpoints.restart_from(self.step)

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        problems = ckpt.config_mismatches(checkpoint.manifest, self.cfg.to_dict())
        if problems:  # `asyncps launch` refuses this before starting; a chief started alone (compose) here
            raise ckpt.CheckpointError(f"{checkpoint.path} cannot continue with this config: {'; '.join(problems)} "
                                       f"(these keys must match the checkpoint's, see docs/failures.md)")
        versions = self.checkpoints.restore(checkpoint)
        self.step, self.resumed_from = global_step(versions), checkpoint.step
        self.carried_seconds = float(checkpoint.manifest.get("seconds", 0.0))  # `time` continues from it
        logger.info(f"chief: restored {len(versions)} shards from {checkpoint.path} (step {checkpoint.step})")
        self._carry_over_failures(checkpoint.step)

    def _carry_over_failures(self, restored_step: int) -> None:
        """Failures of earlier chiefs of this run; the death of the last one, if it died."""
        self.failures = list(self.previous["failures"])
        if self.previous["at_step"] is not None and not self.previous["finished"]:
            self._record_failure("chief", 0, self.previous["at_step"], restored_step)

    def _warn(self, message: str) -> None:
        logger.warning(f"chief: {message}")
        self.log.write("checkpoint_refused", self.step, message=message)

    # ------------------------------------------------------------------------------------------
    # Training

    def train(self) -> None:
        """Watch progress until a stop condition holds."""
        t = self.cfg.train
        progress = Progress(t.max_steps, every=t.log_every)
        next_eval = (self.step // t.eval_every + 1) * t.eval_every if t.eval_every else None
        next_log = (self.step // t.log_every + 1) * t.log_every
        try:
            while True:
                self.step = global_step(self.versions())
                seen_at = self.elapsed()  # when the step was seen: the time an evaluation of it is stamped with
                self.membership.reap()
                progress.update(min(self.step, t.max_steps), workers=len(self.membership.alive()))
                if self.telemetry.due() and self.last_stats is not None:
                    self.telemetry.row(self.step, self.last_stats)
                if self.step >= next_log:
                    self.log.write("progress", self.step, steps_per_second=self.step / self.elapsed())
                    next_log = (self.step // t.log_every + 1) * t.log_every
                while next_eval is not None and next_eval <= self.step and next_eval < t.max_steps:
                    self._guarded(lambda: self.evaluate_milestone(next_eval, seen_at))
                    next_eval += t.eval_every
                if self.target.step is not None and t.target.stop:
                    break
                if self.checkpoints.enabled and self.checkpoints.due(self.step) and self.step < t.max_steps:
                    self._guarded(lambda: self.checkpoints.save(self.elapsed()))
                if self.step >= t.max_steps or (t.max_seconds is not None and self.elapsed() >= t.max_seconds):
                    break
                if (self.run_dir / STOP_FILE).exists():  # a user (or a test) ends the run early, cleanly
                    logger.info(f"chief: {STOP_FILE} found in the run directory; stopping at step {self.step}")
                    self.log.write("stop_requested", self.step, file=STOP_FILE)
                    break
                time.sleep(POLL_SECONDS)
        finally:
            progress.close()

    def versions(self) -> list[int]:
        """Every shard's version; first repairs the model if a shard came back empty."""
        stats = self._stats()
        fresh = [s.shard for s in stats if not s.initialized]
        if fresh:  # the model had reached the survivors' global step (at least the last one seen)
            self.step = max(self.step, global_step([s.version for s in stats if s.initialized]))
            self.recover_shards(fresh)
            stats = self._stats()
        self.last_stats = stats  # for the telemetry rows: no second Stats call
        return [s.version for s in stats]

    def _stats(self):
        """The shards' stats, waiting (a few deadlines) for a shard that is being restarted."""
        for attempt in range(STATS_ATTEMPTS):
            try:
                return self.ps.stats()
            except grpc.RpcError as err:
                # CANCELLED: the call was in flight when a shard's shutdown (SIGTERM) ended it
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED):
                    raise
                logger.warning(f"chief: a shard does not answer ({err.code().name}); waiting")
        raise RunFailed(f"a parameter-server shard stayed unreachable for {STATS_ATTEMPTS} x "
                        f"{self.cfg.cluster.rpc_timeout:g} s (cluster.rpc_timeout); giving up")

    def recover_shards(self, fresh: list[int]) -> None:
        """Restarted (empty) shards: restore EVERY shard from the latest valid checkpoint.

        The failure rows carry every shard's version once paused (`versions_before`; 0 for a
        fresh one) and after the restore (`versions_after`): a surviving shard lost exactly
        before - after updates, so its applied-push counters reconcile with report.json, and
        `at_step` is the survivors' global step when paused (nothing applies after that).
        """
        checkpoint = self.checkpoints.latest(warn=self._warn) if self.checkpoints.enabled else None
        if checkpoint is None:
            raise RunFailed(f"shard(s) {fresh} restarted without their variables and there is no checkpoint to "
                            f"restore the model from (set checkpoint.every_steps or checkpoint.every_seconds)")
        started = time.perf_counter()
        before = self.ps.pause()
        try:
            after = self.checkpoints.restore(checkpoint)
        finally:
            self.ps.resume()
        recovery_ms = (time.perf_counter() - started) * 1e3
        at_step = max(self.step, global_step([v for i, v in enumerate(before) if i not in fresh]))
        for index in fresh:
            self._record_failure("ps", index, at_step, checkpoint.step, recovery_ms=round(recovery_ms, 1),
                                 versions_before=before, versions_after=after, fresh=fresh)

    def _record_failure(self, role: str, index: int, at_step: int, restored_step: int, **extra) -> None:
        row = {"role": role, "index": index, "at_step": at_step, "restored_step": restored_step,
               "steps_lost": max(0, at_step - restored_step), "wall_time": time.time(), **extra}
        self.failures.append(row)
        self.log.write("failure", at_step, **row)
        logger.warning(f"chief: {role} {index} failed at step {at_step}; model at step {restored_step} "
              f"({row['steps_lost']} steps lost)")

    def _guarded(self, action) -> None:
        """Runs `action`; a shard error (one died meanwhile) is logged, the next poll repairs it."""
        try:
            action()
        except grpc.RpcError as err:
            logger.warning(f"chief: {err.code().name} from a shard ({err.details()}); retrying later")
            self.log.write("rpc_error", self.step, code=err.code().name, details=err.details())

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def evaluate(self, params: dict | None = None, versions: list[int] | None = None,
                 seconds: float | None = None) -> dict:
        """Score the shards' current weights on the test set; one `eval` row in metrics.jsonl.

        The row carries wall time, global step, per-shard versions and the staleness of the
        pushes applied since the previous evaluation (difference of the shards' histograms).
        """
        if params is None:
            params, versions = self.ps.pull()
        stats = self.ps.stats()
        since = self._staleness_since_last_eval(stats)
        rows = {"row_staleness": row_staleness_means(stats)} if self.tables else {}
        metrics = self.model.evaluate({**params, **self.row_sources()}, self.data.x_test, self.data.y_test)
        step = global_step(versions)
        self.log.write("eval", step, wall_time=time.time(), versions=versions, staleness=since, **rows, **metrics)
        self.last_eval = metrics
        self.telemetry.evaluation(step, metrics)
        self.target.observe(step, self.elapsed() if seconds is None else seconds, metrics)
        return metrics

    def row_sources(self) -> dict:
        """The id-keyed tables as evaluation reads them: rows fetched by id from the shards that
        own them, none made (an unseen id reads its first values). A milestone evaluation reads
        the dense weights of its exact step and the tables' rows as they are when read (the
        shards keep no past rows); the final one, with the shards paused, is exact."""
        return {name: ShardRows(self.ps, name) for name in self.tables}

    def evaluate_milestone(self, version: int, seconds: float | None = None) -> None:
        """Scores the model as it was at global step `version` exactly (the shards keep those
        values until read: ps/shard.py keep_milestones). When a shard no longer has them (it was
        restored meanwhile, or the chief fell far behind), that evaluation is skipped and said so
        in an `eval_skipped` row: every `eval` row is the model at its step."""
        try:
            params, versions = self.ps.pull(at_version=version)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            logger.warning(f"chief: evaluation at step {version} skipped: {err.details()}")
            self.log.write("eval_skipped", version, message=err.details())
            return
        self.evaluate(params, versions, seconds)

    def _staleness_since_last_eval(self, stats) -> dict:
        now = merged_histogram(stats)
        diff = {s: n - self._eval_histogram.get(s, 0) for s, n in now.items()}
        self._eval_histogram = now
        summary = summarize({s: n for s, n in diff.items() if n > 0})  # a restarted shard's counts restart
        return {k: summary[k] for k in ("count", "mean", "p50", "p99", "max")}

    # ------------------------------------------------------------------------------------------
    # Stop

    def finish(self) -> None:
        """Freeze the shards, score and checkpoint the final weights, collect the workers' last
        metrics, write the report, stop everyone."""
        self.stop.set()
        self.ps.pause()  # no push applies after this: the final model is the one scored
        params, versions = self.ps.pull()
        seconds = self.elapsed()
        final = self.evaluate(params, versions)
        if self.checkpoints.enabled:
            self.checkpoints.save(seconds, already_paused=True)
        self._wait_for_workers_to_see_stop()  # and their last pull-to-push windows to arrive
        stats = self.ps.stats(hot_ids=bool(self.tables))
        if self.telemetry.every:
            self.telemetry.row(global_step(versions), stats, final=True)
        report = cluster_report(self, final, stats, params, seconds)
        self.log.write("final", global_step(versions), evaluation="at stop", **final)
        save_params(Path(self.run_dir) / PARAMS_FILE, params)
        write_report(self.run_dir, report)
        logger.info(f"chief: final {final} at step {global_step(versions)}; report {self.run_dir / 'report.json'}")
        self.ps.stop()

    def _wait_for_workers_to_see_stop(self, timeout: float | None = None) -> None:
        """Until every live worker has sent its last metrics after the stop flag (or is gone)."""
        timeout = timeout or 3 * self.cfg.cluster.heartbeat_interval + 2
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.membership.reap()
            if all(m.index in self.final_reports for m in self.membership.alive()):
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.telemetry.close()
        self.log.close()
        self.server.stop(grace=1.0)
        self.ps.close()


def write_config_once(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.yaml, the resolved config, unless the launcher already wrote it."""
    path = run_dir / "config.yaml"
    if not path.exists():
        atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def previous_incarnation(metrics_path: Path) -> dict:
    """What metrics.jsonl says of the run's earlier chiefs: failures recorded, the last step the
    latest one logged, and whether it finished (wrote `final`)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    failures = [{k: v for k, v in r.items() if k not in ("kind", "step", "time")} for r in rows if r["kind"] == "failure"]
    starts = [i for i, r in enumerate(rows) if r["kind"] == "start"]
    last = rows[starts[-1]:] if starts else []
    return {"failures": failures, "at_step": max((r["step"] for r in last), default=None),
            "time": max((r["time"] for r in last), default=0.0),
            "finished": any(r["kind"] == "final" for r in last)}


class ShardRows:
    """`worker.tables.RowSource` over the shards: ``rows(ids)`` pulls the rows of `ids`."""

    def __init__(self, ps: PSClient, name: str):
        self.ps, self.name = ps, name

    def rows(self, ids):
        import numpy as np

        unique, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        values, _ = self.ps.pull_rows({self.name: unique})[self.name]
        return values[inverse.reshape(-1)]
