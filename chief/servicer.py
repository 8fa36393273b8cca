"""The Chief gRPC service: a thin layer over Membership and the run's stop flag."""
from __future__ import annotations

import threading
import time

import grpc

from asyncps.chief.membership import Membership, MembershipFull
from asyncps.protos import chief_pb2, chief_pb2_grpc

SERVICE_NAME = "asyncps.Chief"
REGISTER_POLL_SECONDS = 0.1


class ChiefServicer(chief_pb2_grpc.ChiefServicer):
    """Register, Heartbeat and ReportMetrics; `on_metrics(report)` receives worker metrics."""

    def __init__(self, membership: Membership, stop: threading.Event, ps_addresses: list[str], seed: int,
                 global_step, on_metrics=None):
        self.membership, self.stop, self.seed = membership, stop, seed
        self.ps_addresses = list(ps_addresses)
        self.global_step = global_step  # callable -> int, the chief's latest view
        self.on_metrics = on_metrics or (lambda report: None)

    def Register(self, request, context):
        """Hands out a worker index (and so a data shard); idempotent per (hostname, pid)."""
        member = self._register(request, context)
        n = self.membership.num_workers
        return chief_pb2.RegisterReply(worker_index=member.index, num_workers=n, data_shard=member.index,
                                       num_data_shards=n, seed=self.seed, ps_addresses=self.ps_addresses)

    def _register(self, request, context):
        """Waits (within the call's deadline) for a slot: a restarted worker may register before
        its predecessor is declared dead."""
        deadline = time.monotonic() + max(0.0, (context.time_remaining() or 30.0) - 1.0)
        while True:
            try:
                return self.membership.register(request.hostname, request.pid)
            except MembershipFull as exc:
                if time.monotonic() >= deadline:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self.membership.reap()
            time.sleep(REGISTER_POLL_SECONDS)

    def Heartbeat(self, request, context):
        """Liveness; the reply carries the stop flag."""
        if self.membership.heartbeat(request.worker_index, request.step) is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"worker {request.worker_index} is not registered (or was declared dead): register again")
        return chief_pb2.HeartbeatReply(should_stop=self.stop.is_set(), global_step=self.global_step())

    def ReportMetrics(self, request, context):
        """Worker metrics, written to metrics.jsonl by the chief."""
        self.on_metrics(request)
        return chief_pb2.MetricsReply()
