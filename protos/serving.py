"""A gRPC server as every asyncps role runs it: message limits, keepalive, health, grace, security.

The standard health service (``grpc.health.v1.Health``) reports NOT_SERVING until `start()` has
bound the port, SERVING after, and NOT_SERVING again once shutdown begins, so compose
healthchecks and `wait_for_ready` clients see only a server that can answer.

Security (`asyncps.protos.security`): with `security` given (a ``SecurityConfig`` or a resolved
``Security``), the port is bound with TLS (mTLS: client certificates required) and every call
but the health service's must carry the job token, or it ends with UNAUTHENTICATED before any
handler runs.

Request streams (`StreamLimits`, `StreamGuard`): a handler reading a client stream holds a
server thread while it waits for the next message, so idle streams could take every thread.
With `streams` given, request streams get their own `max_streams` threads on top of
`max_workers` (unary calls and pulls keep theirs), one connection (``context.peer()``) may
have at most `per_peer` open, and a stream beyond either limit ends at once with
RESOURCE_EXHAUSTED. A stream whose handler waited `idle_timeout` seconds for a message, or
that is still sending after `max_duration` seconds (or its own deadline), ends with
DEADLINE_EXCEEDED, and its thread is free again.

Hostile input: a request whose bytes do not parse as the method's message ends with
INVALID_ARGUMENT (gRPC itself would answer INTERNAL, "Exception deserializing request"), and a
single message above `MAX_MESSAGE_BYTES` with RESOURCE_EXHAUSTED. Tensors travel in ~1 MiB
chunks, so the limit never bites a well-formed stream.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncps.protos.wire_types import UserError
from asyncps.protos import security as _security

logger = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 << 20  # one received message; 64x the codec's chunk (protos/codec.py)
# Tensors are streamed in ~1 MiB messages, but never let gRPC's 4 MiB default bite.
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Accept the clients' keepalive pings (clients send one every 30 s).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", -1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default: a second server on a taken port would start and share
    # its connections; a port in use must be an error instead
    ("grpc.so_reuseport", 0),
]


class RoleServer:
    """A grpc.Server with the health service; `services` are the names health reports on.

    `security`: None (plain TCP, no token), a ``SecurityConfig`` (cluster.security) or a
    ``Security``; `role` picks the certificate ("ps 0" -> ps.pem).
    """

    def __init__(self, role: str, host: str, port: int, services: tuple[str, ...], max_workers: int = 16,
                 security=None, streams: StreamLimits | None = None):
        self.role, self.host, self.requested_port = role, host, port
        self.services = ("",) + tuple(services)
        self.security = _security.INSECURE if security is None else _security.resolve(security, role.split()[0])
        self.health = health.HealthServicer()
        # request streams (if limited) get threads of their own on top of max_workers
        self.streams = None if streams is None else StreamGuard(streams, role)
        max_workers += 0 if streams is None else streams.max_streams
        pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=role)
        self.refusals = _security.Refusals(role)  # calls refused by the token or role check, per code
        self.interceptors = _security.server_interceptors(self.security, self.refusals) + self._stream_guard() + [RequestGuard()]
        self.server = grpc.server(pool, options=SERVER_OPTIONS, interceptors=self.interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    def start(self) -> int:
        """Binds, starts serving, flips health to SERVING; returns the bound port."""
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _security.add_port(self.server, f"{self.host}:{self.requested_port}", self.security)
        if self.port == 0:
            raise UserError(f"{self.role}: cannot listen on {self.host}:{self.requested_port} (port in use?)")
        self.server.start()
        self._set(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING for everyone, then stop, giving in-flight calls `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.streams is not None:
            self.streams.close()

    def _stream_guard(self) -> list:
        return [] if self.streams is None else [self.streams]

    def _set(self, status) -> None:
        for name in self.services:
            self.health.set(name, status)


class _BadRequest(Exception):
    pass


class RequestGuard(grpc.ServerInterceptor):
    """Parses requests inside the handler, so that bytes that are not the method's message end
    the call with INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def decode(raw):
            try:
                return parse(raw)
            except Exception as exc:  # protobuf's DecodeError and friends
                raise _BadRequest(f"{method}: request is not a valid message ({type(exc).__name__}: {exc})") from None

        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)

        if handler.request_streaming:
            def requests(raw_iterator):
                for raw in raw_iterator:
                    yield decode(raw)
        else:
            requests = decode

        if handler.response_streaming:
            def run(raw, context):
                try:
                    yield from behavior(requests(raw), context)
                except _BadRequest as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        else:
            def run(raw, context):
                try:
                    return behavior(requests(raw), context)
                except _BadRequest as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(run, request_deserializer=None, response_serializer=handler.response_serializer)


# ----------------------------------------------------------------------------------------------
# Request streams: admission, idle timeout, overall deadline


STREAM_IDLE_TIMEOUT = 10.0  # seconds a request stream may wait for its next message (a worker's session reopens sooner)


@dataclass(frozen=True)
class StreamLimits:
    """Limits on client-streaming calls (see the module docstring and `StreamGuard`)."""

    max_streams: int = 16  # open at once, all callers together (and threads kept for them)
    per_peer: int = 4  # open at once on one connection
    idle_timeout: float = STREAM_IDLE_TIMEOUT  # seconds the handler may wait for the next message
    max_duration: float = 300.0  # seconds a stream may keep sending (its own deadline, if sooner)


class StreamExpired(Exception):
    """Raised in a handler whose request stream the watchdog ended (idle or over time)."""


_EXPIRED = object()  # handed to a waiting handler in place of a message (see StreamGuard._expire)
LOG_EVERY_S = 10.0
# The chief's control streams (Init, Restore: authorized before admission under mTLS) have their
# own quota, so data streams, idle or hostile, can never leave the chief unable to repair a shard.
CONTROL_STREAMS = frozenset({"Init", "Restore", "RestoreTable"})
CONTROL_STREAM_LIMIT = 4


class _Stream:
    __slots__ = ("peer", "method", "context", "deadline", "waiting_since", "why", "expired_at", "control")

    def __init__(self, peer: str, method: str, context, deadline: float):
        self.peer, self.method, self.context, self.deadline = peer, method, context, deadline
        self.waiting_since: float | None = None  # monotonic time the handler began waiting
        self.why = ""
        self.expired_at: float | None = None
        self.control = False  # an Init/Restore stream, counted in the control quota


class StreamGuard(grpc.ServerInterceptor):
    """Admits client-streaming calls within `StreamLimits` and ends idle or overlong ones.

    Admission is a non-blocking count check at the start of the call: with `max_streams` open
    in total, or `per_peer` on the caller's connection, the call ends with RESOURCE_EXHAUSTED
    before its first message is read. A watchdog thread (started with the first stream) looks
    at every open stream whose handler is waiting for a message: after `idle_timeout` seconds
    of waiting, or past `max_duration` (or the call's own deadline), it wakes the handler with a
    marker in place of a message, and the call ends with DEADLINE_EXCEEDED naming the reason;
    its thread returns to the pool at once. (Sync gRPC has no read with a timeout: the marker
    goes where gRPC's receive callback puts the next request, under gRPC's own lock; where that
    is not possible the call is cancelled instead, and its client sees CANCELLED.)

    `counts`: streams admitted, refused (refused_total, refused_per_peer), ended (idle,
    overtime). Refusals and endings are logged to stderr: the first of each kind, then at most
    one line per LOG_EVERY_S with the count since.
    """

    def __init__(self, limits: StreamLimits, role: str = "server"):
        self.limits, self.role = limits, role
        self._lock = threading.Lock()
        self._open: set[_Stream] = set()
        self._per_peer: Counter = Counter()
        self._control_open = 0  # Init/Restore streams: their own quota (CONTROL_STREAMS)
        self.counts: Counter = Counter()
        self._logged: dict[str, tuple[float, int]] = {}  # kind -> (last log time, count then)
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._tick = max(0.02, min(1.0, limits.idle_timeout / 4))

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        """Stops the watchdog (the server has stopped)."""
        self._closed.set()

    def end(self, method: str, why: str) -> int:
        """Ends every open stream of `method` (its full name): a handler waiting for its next
        message sees StreamExpired(why) at once, one busy with a message after it (a stopping
        server's idle request streams, which would otherwise hold its grace). The number ended."""
        with self._lock:
            streams = [s for s in self._open if s.method == method and s.expired_at is None]
        for stream in streams:
            stream.why, stream.expired_at = f"{self.role}: {method}: {why}", time.monotonic()
            if stream.context is not None:
                self._expire(stream.context)
        return len(streams)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not handler.request_streaming:
            return handler
        kind = "stream_" + ("stream" if handler.response_streaming else "unary")
        behavior, method = getattr(handler, kind), details.method

        if handler.response_streaming:
            def run(requests, context):
                stream = self._admit(context, method)
                try:
                    yield from behavior(self._watched(requests, stream), context)
                except StreamExpired as exc:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
                finally:
                    self._release(stream)
        else:
            def run(requests, context):
                stream = self._admit(context, method)
                try:
                    return behavior(self._watched(requests, stream), context)
                except StreamExpired as exc:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
                finally:
                    self._release(stream)

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(run, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _admit(self, context, method: str) -> _Stream:
        limits, peer = self.limits, context.peer()
        control = method.rsplit("/", 1)[-1] in CONTROL_STREAMS
        with self._lock:
            if control:  # the chief's own quota: data streams can never use it up
                if self._control_open >= CONTROL_STREAM_LIMIT:
                    refusal = "refused_control", (f"{self._control_open} control streams open, the limit is "
                                                  f"{CONTROL_STREAM_LIMIT}")
                else:
                    refusal = None
            elif len(self._open) - self._control_open >= limits.max_streams:
                refusal = "refused_total", f"{len(self._open)} request streams open, the limit is {limits.max_streams}"
            elif self._per_peer[peer] >= limits.per_peer:
                refusal = "refused_per_peer", (f"{self._per_peer[peer]} request streams open on this connection, "
                                               f"the limit is {limits.per_peer}")
            else:
                refusal = None
            if refusal is None:
                remaining = context.time_remaining()
                deadline = time.monotonic() + min(limits.max_duration, remaining if remaining is not None else 1e9)
                stream = _Stream(peer, method, context, deadline)
                stream.control = control
                self._open.add(stream)
                self._control_open += control
                self._per_peer[peer] += 0 if control else 1
                self.counts["admitted"] += 1
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, name=f"{self.role} stream watchdog",
                                                      daemon=True)
                    self._watchdog.start()
        if refusal is not None:
            self._note(refusal[0], f"{method} from {peer} refused: {refusal[1]}")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.role}: {refusal[1]}; try again later")
        return stream

    def _release(self, stream: _Stream) -> None:
        stream.context = None  # the watchdog keeps no finished call
        with self._lock:
            if stream in self._open:
                self._open.discard(stream)
                self._control_open -= stream.control
                self._per_peer[stream.peer] -= 0 if stream.control else 1
                if not self._per_peer[stream.peer]:
                    del self._per_peer[stream.peer]

    @staticmethod
    def _watched(requests, stream: _Stream):
        """The request iterator, with the handler's waits visible to the watchdog."""
        it = iter(requests)
        while True:
            stream.waiting_since = time.monotonic()
            try:
                message = next(it)
            except StopIteration:
                return
            finally:
                stream.waiting_since = None
            if message is _EXPIRED or stream.expired_at is not None:
                raise StreamExpired(stream.why)
            yield message

    def _watch(self) -> None:
        limits = self.limits
        while not self._closed.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                streams = list(self._open)
            for stream in streams:
                since, context = stream.waiting_since, stream.context
                if context is None:
                    continue
                if stream.expired_at is not None:  # woken, yet still waiting: cancel the call
                    if since is not None and now - stream.expired_at > 1.0:
                        context.cancel()
                    continue
                if since is None:
                    continue
                if now - since >= limits.idle_timeout:
                    kind, why = "idle", f"no message for {limits.idle_timeout:g} s (the stream idle timeout)"
                elif now >= stream.deadline:
                    kind, why = "overtime", "still sending at the stream's deadline"
                else:
                    continue
                stream.why = f"{self.role}: {stream.method}: {why}"
                stream.expired_at = now
                self._note(kind, f"{stream.method} from {stream.peer} ended: {why}")
                self._expire(context)

    @staticmethod
    def _expire(context) -> None:
        """Wakes the handler waiting in `context`'s request iterator with the _EXPIRED marker."""
        state = getattr(context, "_state", None)
        condition = getattr(state, "condition", None)
        if state is None or condition is None or not hasattr(state, "request"):
            context.cancel()
            return
        with condition:
            if state.request is None:
                state.request = _EXPIRED
                condition.notify_all()

    def _note(self, kind: str, line: str) -> None:
        """Counts and logs (rate-limited per kind) a refusal or an ending."""
        with self._lock:
            self.counts[kind] += 1
            count = self.counts[kind]
            last, logged = self._logged.get(kind, (None, 0))
            now = time.monotonic()
            if last is not None and now - last < LOG_EVERY_S:
                return
            self._logged[kind] = (now, count)
        since = f" ({count - logged} {kind} since the last line, {count} in all)" if last is not None else ""
        logger.warning(f"asyncps {self.role}: {line}{since}")
