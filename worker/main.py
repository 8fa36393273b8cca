"""The worker process: register with the chief, then pull, compute, push until told to stop.

Each step sends the gradient and receives the new weights in one round trip per shard
(PushPull), so the next step starts on the freshest weights the shards had when the push was
applied. The data this worker reads is its own shard of the training set, chosen by the index
the chief assigned, so a restarted worker that gets the same index reads the same shard.

A model with an id-keyed table (`id_tables`, docs/sparse.md) reads its next batch before it
pushes: the push of step t carries the summed row gradients of batch t (with the row versions
it read) and asks for the rows of batch t+1's unique ids, which come back with the dense
weights in the same round trip. So a step still costs one round trip per shard, and its bytes
grow with the batch's unique ids, never with the table.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import grpc
import numpy as np

from asyncps.cluster import ClusterSpec
from asyncps.config import Config
from asyncps.errors import UserError
from asyncps.ps_client import RETRIED_CODES, PSClient, TableGrad
from asyncps.telemetry import DurationWindow
from asyncps.update_log import open_worker_log
from asyncps.worker.chief_client import ChiefClient, Heartbeat
from asyncps.worker.data import BatchStream, load_dataset
from asyncps.worker.delays import DelayModel, StalenessSampler
from asyncps.worker.models import build_model
from asyncps.worker.step import GradientComputer, limit_blas_threads
from asyncps.worker.tables import TableBatches, table_grad
from asyncps.worker.variables import initial_params, placement_for, trainable_names

logger = logging.getLogger(__name__)

REPORT_EVERY_SECONDS = 2.0
FINAL_REPORT_KEY = "worker/final_report"  # in a worker's last ReportMetrics (chief/main.py waits for it)
# time the loop gets to finish its step once the chief says stop: nothing it pushes after that is
# applied (the chief paused the shards first), so a push left waiting there is not waited for
STOP_GRACE_SECONDS = 0.25
# Errors after which a worker re-registers and re-pulls instead of exiting (common/ps_client.py
# RETRIED_CODES: a shard restarted: FAILED_PRECONDITION, UNAVAILABLE, or CANCELLED by its shutdown
# on SIGTERM; restored to a version older than the one read: OUT_OF_RANGE; too slow, frozen or
# full: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED); MAX_REJOINS in a row without a successful push end
# the worker. INVALID_ARGUMENT (a NaN gradient, a wrong shape) is never retried: the worker exits 1
# with the shard's message. (The worker's own cancellations happen only once it stops.)
REJOIN_CODES = RETRIED_CODES
MAX_REJOINS = 20


def run_worker(cfg: Config, spec: ClusterSpec) -> int:
    """Trains until the chief says stop; returns the process exit code."""

    chief = ChiefClient(spec.chief, cfg.cluster.rpc_timeout, security=cfg.cluster.security)
    reply = chief.register(preferred=spec.task_index)  # launch: the slot naming this worker's log
    index = reply.worker_index
    logger.info(f"worker {index}: registered ({reply.num_workers} workers, data shard {reply.data_shard})")
    # Heartbeats start before the data loads: on a busy machine loading MNIST can outlast the
    # chief's heartbeat timeout, and a worker declared dead at step 0 would stop training.
    progress: dict[str, WorkerLoop | None] = {"loop": None}  # set once the data has loaded

    def flush_last_metrics() -> None:
        current = progress["loop"]
        if current is not None and current.reporter:
            current.reporter.flush(final=True)

    beat = Heartbeat(chief, index, lambda: progress["loop"].seq if progress["loop"] else 0,
                     cfg.cluster.heartbeat_interval, give_up=cfg.cluster.heartbeat_timeout,
                     on_stop=flush_last_metrics)
    beat.start()
    signal.signal(signal.SIGTERM, lambda *_: beat.finish("SIGTERM"))
    loop = progress["loop"] = WorkerLoop(cfg, reply, list(reply.ps_addresses) or list(spec.ps))
    logger.info(f"worker {index}: data loaded; waiting for the start barrier")
    try:
        error = run_until_stopped(loop, beat, chief) if beat.wait_for_start() else None
    finally:
        beat.stop.set()
        chief.close()
        loop.close()  # ends a push left waiting at a frozen shard, so the process exits now
    if error is not None and not beat.reason:
        logger.warning(f"worker {index}: {describe(error)}")
        return 2 if isinstance(error, UserError) else 1  # 2: an input mistake (cluster.transport shm here): no restart
    logger.info(f"worker {index}: stopped after {loop.seq} pushes ({beat.reason or 'run over'})")
    if beat.declared_dead:  # still able to train: exit non-zero so the restart policy brings a new one
        return 1
    return 128 + signal.SIGTERM if beat.reason == "SIGTERM" else 0  # not the chief's stop: restartable


def run_until_stopped(loop: "WorkerLoop", beat, chief) -> BaseException | None:
    """Runs the loop in a daemon thread; returns once it ends or the chief says stop.

    The chief freezes the shards before it stops them, so a push may be left waiting at a
    shard when the run ends: the stop flag, not that call, decides when this process exits.
    """
    done, errors = threading.Event(), []

    def body():
        try:
            loop.run(beat.stop, chief)
        except BaseException as exc:  # reported by the caller, with the stop flag in view
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, name="train-loop", daemon=True).start()
    while not done.wait(0.1):
        if beat.stop.is_set():
            done.wait(STOP_GRACE_SECONDS)
            break
    if errors and not beat.stop.is_set() and beat.beat_now():
        beat.reason = "the chief asked to stop"
    return errors[0] if errors else None


def report_metrics(chief, index: int, seq: int, values: dict) -> None:
    """Best effort: a chief being restarted must not end the training loop."""
    try:
        chief.report(index, seq, time.time(), values)
    except grpc.RpcError:
        pass


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


class LossReporter:
    """Sends the mean training loss and the pull-to-push times (common/telemetry.py) to the chief
    every REPORT_EVERY_SECONDS."""

    def __init__(self, chief, index: int):

        self.chief, self.index = chief, index
        self.last = time.monotonic()
        self.losses: list[float] = []
        self.step = 0
        self.pull_to_push = DurationWindow()  # seconds from the weights' arrival to the push

    def add(self, step: int, loss: float) -> None:
        self.step = step
        self.losses.append(loss)
        if time.monotonic() - self.last > REPORT_EVERY_SECONDS:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Sends what was measured since the last report; `final`: the last one of this worker
        (the chief waits for it before its final telemetry row, so no window is lost)."""
        values = {**({"train/loss": float(np.mean(self.losses))} if self.losses else {}), **self.pull_to_push.flush()}
        if final:
            values[FINAL_REPORT_KEY] = 1.0
        if values:
            report_metrics(self.chief, self.index, self.step, values)
        self.last, self.losses = time.monotonic(), []


class WorkerLoop:
    """The pull-compute-push loop of one worker."""

    def __init__(self, cfg: Config, reply, ps_addresses: list[str]):

        limit_blas_threads(1)  # workers are the parallelism: a BLAS pool each oversubscribes the cores
        self.cfg, self.index = cfg, reply.worker_index
        self.data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
        model = build_model(cfg.model, self.data.meta)
        params0 = initial_params(cfg, model)
        self.tables = id_tables_of(model, cfg)  # {name: dim}: rows by id from the shards (docs/sparse.md)
        self.ps = PSClient(ps_addresses, placement_for(params0, len(ps_addresses)), cfg.cluster, tables=self.tables)
        clocks = self.ps.register(self.index)
        # A rejoining worker continues its sequence numbers, so no push of its is mistaken for a retry.
        self.seq = max(last_seq for _, last_seq in clocks) + 1
        self.compute = GradientComputer(model, trainable_names(params0, cfg.train.frozen) + list(self.tables),
                                        cfg.train.graph_mode)
        self.stream = BatchStream(len(self.data.x_train), cfg.train.batch_size, reply.data_shard,
                                  reply.num_data_shards, reply.seed, start_step=self.seq)
        self.batches = TableBatches(next(iter(self.tables)), self.stream, self.data.x_train) if self.tables else None
        self.rng = np.random.default_rng([reply.seed, self.index, self.seq])
        self.delay = DelayModel(cfg.delay, self.index, reply.seed)  # injected after compute, before push
        self.rejoins = 0  # rejoins in a row without a successful push
        self.reporter: LossReporter | None = None  # set when the loop starts
        self.update_log = open_worker_log(cfg, self.index, reply.data_shard, reply.num_data_shards, reply.seed,
                                          len(ps_addresses))
        # Controlled staleness: the k-th pull of this process asks for the values of r versions ago,
        # r = draw k of the sampler `asyncps train` uses (worker 0's sequence is train's).
        self.ages = StalenessSampler(cfg.staleness, reply.seed, self.index) if cfg.staleness.controlled else None

    def run(self, stop, chief) -> None:
        if self.batches is not None:
            if self.cfg.cluster.prefetch:
                logger.info(f"worker {self.index}: cluster.prefetch is not used with id-keyed tables (docs/sparse.md)")
            return self.run_with_tables(stop, chief)
        if self.cfg.cluster.prefetch and self.cfg.cluster.mode == "async" and self.ages is None:
            return self.run_prefetching(stop, chief)  # (controlled staleness decides the reads itself)
        # Each step is done with its weights before its push-pull, and computes its gradient
        # after the last one returned: weights are read from the shared-memory segment and
        # gradients computed into it, no copy either way (PSClient.pulled_views, push_buffers).
        self.ps.pulled_views = True
        dense = [n for n in self.compute.trainable if n not in self.tables]
        params, versions = self.rejoin(stop)  # the first pull, robust to a shard being restarted or restored
        reporter = self.reporter = LossReporter(chief, self.index)
        while not stop.is_set():
            pulled = time.perf_counter()
            loss, grads = self.gradient(params, versions, stop, into=self.ps.push_buffers(self.index, dense))
            reporter.pull_to_push.add(time.perf_counter() - pulled)
            params, versions = self.push_or_rejoin(grads, versions, stop)
            reporter.add(self.seq, loss)

    def run_with_tables(self, stop, chief) -> None:
        """The loop of a model with an id-keyed table (module docstring): compute on batch t's
        rows, push its row gradients and pull batch t+1's rows in one push-pull."""
        batches = self.batches
        assert batches is not None  # (run() calls this only for a model with a table)
        self.ps.pulled_views = True  # (as in run)
        params, versions, rows = self.rejoin(stop, self.pull_with_rows)
        reporter = self.reporter = LossReporter(chief, self.index)
        while not stop.is_set():
            pulled = time.perf_counter()
            indices, batch, ids, local = batches.advance()
            if self.update_log is not None:
                self.update_log.step(self.seq, self.stream.step_of(batch), self.rng, versions)
            started = time.perf_counter()
            (name, (values, row_versions)), = rows.items()
            loss, grads = self.compute({**params, name: values}, local, self.data.y_train[indices], self.rng)
            table_grads = {name: TableGrad(*table_grad(grads.pop(name), ids, row_versions))}
            if self.delay.active:
                self.delay.wait(self.seq, time.perf_counter() - started, stop)
            reporter.pull_to_push.add(time.perf_counter() - pulled)
            try:
                _, params, versions, rows = self.ps.push_pull_rows(grads, versions, self.index, self.seq,
                                                                   table_grads=table_grads,
                                                                   table_ids=batches.wanted())
                self.seq, self.rejoins = self.seq + 1, 0
            except grpc.RpcError as err:
                self.note_lost_view(err, stop)
                params, versions, rows = self.rejoin(stop, self.pull_with_rows)
            reporter.add(self.seq, loss)

    def pull_with_rows(self):
        """The dense weights and the rows of the upcoming batch's ids."""
        assert self.batches is not None
        return self.ps.pull_with_rows(self.batches.wanted(), worker=self.index)

    def gradient(self, params, versions, stop, into=None):
        """(loss, gradients) of the next batch on `params` (read at the shards' `versions`), then
        the configured delay (before the push); `into`: arrays to compute gradients in."""
        indices, batch = next(self.stream)
        if self.update_log is not None:
            self.update_log.step(self.seq, self.stream.step_of(batch), self.rng, versions)
        started = time.perf_counter()
        loss, grads = self.compute(params, self.data.x_train[indices], self.data.y_train[indices], self.rng, out=into)
        if self.delay.active:
            self.delay.wait(self.seq, time.perf_counter() - started, stop)
        return loss, grads

    def run_prefetching(self, stop, chief) -> None:
        """The loop with cluster.prefetch (async only): the push-pull of step t travels in the
        background while step t+1 computes on the weights step t started from, so the transfer
        overlaps the math. Each gradient carries the versions it was computed on: the shards
        record the extra version of staleness like any other."""
        params, versions = self.rejoin(stop)  # the first pull, robust to a shard being restarted or restored
        pulled = time.perf_counter()  # when `params` arrived (telemetry: pull to push)
        pending = None  # the push-pull in flight
        reporter = self.reporter = LossReporter(chief, self.index)
        while not stop.is_set():
            loss, grads = self.gradient(params, versions, stop)
            fresh = None
            if pending is not None:
                fresh, pending = self.settle(pending, stop), None
                if fresh is None:  # the shards lost this worker: registered again, re-pulled
                    params, versions = self.rejoin(stop)
                    pulled = time.perf_counter()
                    continue  # (this gradient was computed on weights the shards no longer have)
            reporter.pull_to_push.add(time.perf_counter() - pulled)
            pending = self.ps.push_pull_async(grads, versions, self.index, self.seq)
            self.seq += 1
            if fresh is not None:
                params, versions = fresh
                pulled = time.perf_counter()
            reporter.add(self.seq, loss)

    def settle(self, pending, stop):
        """(params, versions) of a finished background push-pull; None when the worker must
        rejoin (the same errors as `push_or_rejoin`)."""
        try:
            _, params, versions = pending.result()
            self.rejoins = 0
            return params, versions
        except grpc.RpcError as err:
            self.note_lost_view(err, stop)
            return None

    def note_lost_view(self, err: grpc.RpcError, stop) -> None:
        """Re-raises `err` unless the worker should register again (see `push_or_rejoin`)."""
        self.rejoins += 1
        if stop.is_set() or err.code() not in REJOIN_CODES or self.rejoins > MAX_REJOINS:
            raise err
        logger.warning(f"worker {self.index}: {describe(err)}; registering again and re-pulling")

    def push_or_rejoin(self, grads, versions, stop):
        """push_pull, then the next seq; when the shards lost this worker's view (a shard was
        restarted, or every shard restored from a checkpoint: FAILED_PRECONDITION, a read version
        the shard no longer has: OUT_OF_RANGE, UNAVAILABLE), the gradient is dropped and the
        worker registers again and re-pulls (see docs/failures.md)."""
        try:
            _, params, versions = self.ps.push_pull(grads, versions, self.index, self.seq, pull_age=self.next_age())
            self.seq, self.rejoins = self.seq + 1, 0
            return params, versions
        except grpc.RpcError as err:
            self.note_lost_view(err, stop)
            return self.rejoin(stop)

    def rejoin(self, stop, pull=None):
        """Registers again with every shard and pulls (`pull()`, default a pull of every
        variable), until the shards are back (or stop)."""
        deadline = time.monotonic() + 2 * self.cfg.cluster.rpc_timeout
        while True:
            try:
                clocks = self.ps.register(self.index)
                self.seq = max(self.seq + 1, max(last_seq for _, last_seq in clocks) + 1)  # never reuse a seq
                if pull is not None:
                    return pull()
                return self.ps.pull(worker=self.index, age=self.next_age())
            except grpc.RpcError as err:
                if stop.is_set() or err.code() not in REJOIN_CODES or time.monotonic() > deadline:
                    raise
                stop.wait(0.2)

    def next_age(self) -> int:
        """The age of the next pull: the next draw (0 unless controlled staleness)."""
        return self.ages.draw() if self.ages is not None else 0

    def close(self) -> None:
        self.ps.close()
        if self.update_log is not None:
            self.update_log.close()


def id_tables_of(model, cfg: Config) -> dict[str, int]:
    """The model's id-keyed tables ({name: row width}); one at most, in a mode they train in."""
    tables = dict(getattr(model, "id_tables", None) or {})
    if len(tables) > 1:
        raise UserError(f"model {model.name}: id-keyed tables read the batch's ids: one table per model, got "
                        f"{sorted(tables)}")
    if tables and (cfg.cluster.mode not in ("async", "ssp") or cfg.staleness.controlled or cfg.train.graph_mode
                   or cfg.optimizer.staleness_policy.name != "none"):
        raise UserError(f"model {model.name} (id-keyed table {next(iter(tables))}) trains with cluster.mode async or "
                        "ssp, without staleness.controlled, train.graph_mode and optimizer.staleness_policy")
    return tables
