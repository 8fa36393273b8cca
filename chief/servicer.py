"""The Chief gRPC service: a thin layer over Membership and the run's stop flag.

Requests are checked before anything changes (tests/test_chief_fuzz.py): a bad worker index, a
negative step, an identity without a host name or with a pid <= 0, a metric that is not finite or
whose name is empty, too long or one of the row's own keys (RESERVED_METRICS) are INVALID_ARGUMENT;
a heartbeat or a report of a worker that is not a live member is NOT_FOUND (heartbeats adopt an
index never handed out, see membership.py); a rejected call changes no membership and logs nothing.
"""
from __future__ import annotations

import math
import threading
import time

import grpc

from asyncps.chief.membership import Membership, MembershipFull
from asyncps.protos import chief_pb2, chief_pb2_grpc

SERVICE_NAME = "asyncps.Chief"
REGISTER_POLL_SECONDS = 0.1
MAX_HOSTNAME = 255  # bytes, a DNS name's limit
MAX_METRICS, MAX_METRIC_NAME = 64, 128  # per report; characters
RESERVED_METRICS = frozenset({"kind", "step", "time", "worker", "worker_step"})  # keys of the metrics.jsonl row


def identity_problem(request) -> str | None:
    """Why a RegisterRequest names no process (None if it does)."""
    if not request.hostname or len(request.hostname.encode()) > MAX_HOSTNAME:
        return f"hostname must have 1 to {MAX_HOSTNAME} bytes, got {len(request.hostname.encode())}"
    if request.pid <= 0:
        return f"pid must be positive, got {request.pid}"
    return None


def metrics_problem(request) -> str | None:
    """Why a MetricsReport cannot be logged as one strict-JSON row (None if it can)."""
    if request.step < 0 or not math.isfinite(request.wall_time):
        return f"step must be >= 0 and wall_time finite, got {request.step} and {request.wall_time}"
    if len(request.values) > MAX_METRICS:
        return f"{len(request.values)} metrics in one report, at most {MAX_METRICS}"
    for name, value in request.values.items():
        if not name or len(name) > MAX_METRIC_NAME or name in RESERVED_METRICS:
            return f"metric name {name[:MAX_METRIC_NAME]!r}: empty, longer than {MAX_METRIC_NAME} or reserved"
        if not math.isfinite(value):
            return f"metric {name!r} is {value} (not finite)"
    return None


class ChiefServicer(chief_pb2_grpc.ChiefServicer):
    """Register, Heartbeat and ReportMetrics; `on_metrics(report)` receives worker metrics."""

    def __init__(self, membership: Membership, stop: threading.Event, ps_addresses: list[str], seed: int,
                 global_step, on_metrics=None, started: threading.Event | None = None):
        self.membership, self.stop, self.seed = membership, stop, seed
        self.started = started if started is not None else threading.Event()  # the start barrier passed
        self.ps_addresses = list(ps_addresses)
        self.global_step = global_step  # callable -> int, the chief's latest view
        self.on_metrics = on_metrics or (lambda report: None)

    def Register(self, request, context):
        """Hands out a worker index (and so a data shard); idempotent per (hostname, pid)."""
        if (problem := identity_problem(request)) is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Register: {problem}")
        if request.HasField("preferred_index"):
            self._check_index(request.preferred_index, context)
        member = self._register(request, context)
        n = self.membership.num_workers
        return chief_pb2.RegisterReply(worker_index=member.index, num_workers=n, data_shard=member.index,
                                       num_data_shards=n, seed=self.seed, ps_addresses=self.ps_addresses)

    def _register(self, request, context):
        """Waits (within the call's deadline) for a slot: a restarted worker may register before
        its predecessor is declared dead."""
        deadline = time.monotonic() + max(0.0, (context.time_remaining() or 30.0) - 1.0)
        preferred = request.preferred_index if request.HasField("preferred_index") else None
        while True:
            self.membership.reap()  # a restarted worker's predecessor is gone: its slot is free now
            try:
                return self.membership.register(request.hostname, request.pid, preferred)
            except MembershipFull as exc:
                if time.monotonic() >= deadline:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            time.sleep(REGISTER_POLL_SECONDS)

    def Heartbeat(self, request, context):
        """Liveness and readiness; the reply carries the stop flag and the start barrier's state."""
        self._check_index(request.worker_index, context)
        if request.step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Heartbeat: step must be >= 0, got {request.step}")
        if self.membership.heartbeat(request.worker_index, request.step, request.ready) is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"worker {request.worker_index} is not registered (or was declared dead): register again")
        return chief_pb2.HeartbeatReply(should_stop=self.stop.is_set(), global_step=self.global_step(),
                                        start=self.started.is_set())

    def ReportMetrics(self, request, context):
        """Worker metrics, written to metrics.jsonl by the chief."""
        self._check_index(request.worker_index, context)
        if (problem := metrics_problem(request)) is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReportMetrics: {problem}")
        if not any(m.index == request.worker_index for m in self.membership.alive()):
            context.abort(grpc.StatusCode.NOT_FOUND, f"worker {request.worker_index} is not a live member: register first")
        self.on_metrics(request)
        return chief_pb2.MetricsReply()

    def _check_index(self, index: int, context) -> None:
        if not 0 <= index < self.membership.num_workers:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"worker index {index} is out of range [0, {self.membership.num_workers})")
