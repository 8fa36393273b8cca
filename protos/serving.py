"""A gRPC server as every asyncps role runs it: message limits, keepalive, health, grace, security.

The standard health service (``grpc.health.v1.Health``) reports NOT_SERVING until `start()` has
bound the port, SERVING after, and NOT_SERVING again once shutdown begins, so compose
healthchecks and `wait_for_ready` clients see only a server that can answer.

Security (`asyncps.protos.security`): with `security` given (a ``SecurityConfig`` or a resolved
``Security``), the port is bound with TLS (mTLS: client certificates required) and every call
but the health service's must carry the job token, or it ends with UNAUTHENTICATED before any
handler runs.

Hostile input: a request whose bytes do not parse as the method's message ends with
INVALID_ARGUMENT (gRPC itself would answer INTERNAL, "Exception deserializing request"), and a
single message above `MAX_MESSAGE_BYTES` with RESOURCE_EXHAUSTED. Tensors travel in ~1 MiB
chunks, so the limit never bites a well-formed stream.
"""
from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asyncps.errors import UserError
from asyncps.protos import security as _security

MAX_MESSAGE_BYTES = 64 << 20  # one received message; 64x the codec's chunk (protos/codec.py)
# Tensors are streamed in ~1 MiB messages, but never let gRPC's 4 MiB default bite.
MESSAGE_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Accept the clients' keepalive pings (clients send one every 30 s).
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", -1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class RoleServer:
    """A grpc.Server with the health service; `services` are the names health reports on.

    `security`: None (plain TCP, no token), a ``SecurityConfig`` (cluster.security) or a
    ``Security``; `role` picks the certificate ("ps 0" -> ps.pem).
    """

    def __init__(self, role: str, host: str, port: int, services: tuple[str, ...], max_workers: int = 16,
                 security=None):
        self.role, self.host, self.requested_port = role, host, port
        self.services = ("",) + tuple(services)
        self.security = _security.INSECURE if security is None else _security.resolve(security, role.split()[0])
        self.health = health.HealthServicer()
        pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=role)
        self.refusals = _security.Refusals(role)  # calls refused by the token or role check, per code
        self.interceptors = _security.server_interceptors(self.security, self.refusals) + [RequestGuard()]
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
