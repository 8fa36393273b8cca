"""The worker's side of the Chief service: register once, heartbeat in the background."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import grpc

from asyncps.protos import chief_pb2, chief_pb2_grpc

_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "asyncps.Chief"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


class ChiefClient:
    """Calls to the chief, each with a deadline; build it inside the process that uses it."""

    def __init__(self, address: str, timeout: float, security=None):
        self.timeout = timeout
        from asyncps.protos.security import open_channel  # security None: from the environment
        self._channel = open_channel(address, security, options=[
            ("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)])
        self._stub = chief_pb2_grpc.ChiefStub(self._channel)

    def register(self, preferred: int | None = None) -> chief_pb2.RegisterReply:
        """This process's worker index and data shard (waits for the chief to come up);
        `preferred`: the index asked for (TF_CONFIG's task index), granted when free."""
        request = chief_pb2.RegisterRequest(hostname=socket.gethostname(), pid=os.getpid(), preferred_index=preferred)
        return self._stub.Register(request, timeout=self.timeout, wait_for_ready=True)

    def heartbeat(self, index: int, step: int, ready: bool = False) -> chief_pb2.HeartbeatReply:
        request = chief_pb2.HeartbeatRequest(worker_index=index, step=step, ready=ready)
        return self._stub.Heartbeat(request, timeout=self.timeout)

    def report(self, index: int, step: int, wall_time: float, values: dict[str, float]) -> None:
        request = chief_pb2.MetricsReport(worker_index=index, step=step, wall_time=wall_time, values=values)
        self._stub.ReportMetrics(request, timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()


# While the worker's step counter stands still (a push held at a paused shard or at the
# train.max_steps cap, an ssp or sync wait) it beats this often instead of every `interval`: the
# chief's stop reaches a worker within about this long rather than up to a whole interval later.
# That was most of the 0.5-1 s a launch spent between its last step and its exit (2-core machine).
STALLED_BEAT_SECONDS = 0.05


class StallWatch:
    """Whether a step counter has stood still for longer than its steps usually take (at least
    `floor` seconds; three mean step times for slower steps, so a slow model does not look stalled
    between steps). Fed by one thread: `seen(step, now)` at each look."""

    def __init__(self, floor: float = 2 * STALLED_BEAT_SECONDS):
        self.floor = floor
        self.step: int | None = None
        self.moved_at = 0.0
        self.mean_step = 0.0  # seconds per step, a moving average over looks that saw steps

    def seen(self, step: int, now: float) -> bool:
        """Record a look at the counter; True while it is stalled."""
        if self.step is None or step != self.step:
            if self.step is not None and step > self.step:
                per_step = (now - self.moved_at) / (step - self.step)
                self.mean_step = per_step if not self.mean_step else 0.8 * self.mean_step + 0.2 * per_step
            self.step, self.moved_at = step, now
            return False
        return now - self.moved_at > max(self.floor, 3 * self.mean_step)


class Heartbeat(threading.Thread):
    """Beats every `interval` seconds; sets `stop` when the chief says so or cannot be reached.

    `step()` gives the worker's current local step. A chief that stays unreachable for
    `give_up` seconds means the run is over (or the chief died, which the launcher handles).
    Once training has started, a step counter that stands still (`StallWatch`) makes it beat
    every `STALLED_BEAT_SECONDS`, so a worker held at a frozen shard learns of the stop at once.
    """

    def __init__(self, client: ChiefClient, index: int, step, interval: float, give_up: float, on_stop=None):
        super().__init__(name="heartbeat", daemon=True)
        self.client, self.index, self.step = client, index, step
        self.on_stop = on_stop or (lambda: None)  # called once when the chief says stop
        self.interval, self.give_up = interval, give_up
        self.stop = threading.Event()
        self.ready = False  # data loaded: told to the chief in every beat (the start barrier)
        self.started = threading.Event()  # the chief says step 0 has passed
        self.reason = ""
        self.declared_dead = False  # the chief no longer knows this worker (NOT_FOUND)

    def run(self) -> None:
        failing_since = None
        watch = StallWatch()
        last_beat = time.monotonic()
        while not self.stop.wait(min(self.interval, STALLED_BEAT_SECONDS)):
            now = time.monotonic()
            stalled = watch.seen(self.step(), now) and self.started.is_set()
            if now - last_beat < (STALLED_BEAT_SECONDS if stalled else self.interval):
                continue
            last_beat = now
            try:
                reply = self.client.heartbeat(self.index, self.step(), self.ready)
            except grpc.RpcError as err:
                failing_since = failing_since or time.monotonic()
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    self.declared_dead = True
                    self.finish(f"declared dead by the chief: {err.details()}")
                elif time.monotonic() - failing_since > self.give_up:
                    self.finish(f"chief: {err.code().name} {err.details()}")
                continue
            failing_since = None
            self._took(reply)

    def _took(self, reply) -> None:
        if reply.start:
            self.started.set()
        if reply.should_stop and not self.stop.is_set():
            try:
                self.on_stop()  # the last metrics, while the chief still listens
            finally:
                self.finish("the chief asked to stop")

    def beat_now(self) -> bool:
        """One synchronous heartbeat; True if the run should stop."""
        try:
            return self.client.heartbeat(self.index, self.step(), self.ready).should_stop
        except grpc.RpcError:
            return True

    def wait_for_start(self, poll: float = 0.05) -> bool:
        """Says this worker is ready and waits until the chief's start barrier has passed (or the
        run stops); True to train. Beats every `poll` seconds meanwhile, so that every worker
        starts within about `poll` of step 0."""
        self.ready = True
        while not self.started.is_set() and not self.stop.is_set():
            try:
                self._took(self.client.heartbeat(self.index, self.step(), True))
            except grpc.RpcError:
                pass  # the background beats decide whether the chief is gone
            self.started.wait(poll)
        return not self.stop.is_set()

    def finish(self, reason: str) -> None:
        """Ends the run for this worker (the chief said stop, SIGTERM, or the chief is gone)."""
        self.reason = reason
        self.stop.set()

