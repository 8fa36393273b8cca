"""TLS, mutual TLS and a shared job token for every asyncps gRPC server and client.

Settings come from the YAML (``cluster.security``, `asyncps.config.SecurityConfig`) or, for
tools that have no config (`asyncps health`, a client built without one), from the environment:

    ASYNCPS_TLS_DIR    a folder made by `asyncps certs`: ca.pem, ROLE.pem, ROLE-key.pem
    ASYNCPS_TLS_CA / ASYNCPS_TLS_CERT / ASYNCPS_TLS_KEY    single files instead (PEM)
    ASYNCPS_MTLS=1     present the client certificate (implied by ASYNCPS_TLS_CERT)
    ASYNCPS_TOKEN / ASYNCPS_TOKEN_FILE                  the job token, or a file holding it
    ASYNCPS_ROLE       the certificate of ROLE.pem to present (default: TF_CONFIG's task.type, else client)

What is checked, on every server built by `asyncps.protos.serving.RoleServer`:

- TLS: the server presents ROLE.pem (signed by the job's CA); clients verify it against ca.pem,
  host name included (the certificates carry SANs for 127.0.0.1, localhost, ps0.., chief).
- mTLS: the server also demands a client certificate signed by the same CA
  (``require_client_auth=True``); a client without one fails the handshake (UNAVAILABLE on the
  client side: no call reaches a handler).
- Token: every call must carry ``authorization: Bearer TOKEN`` (or ``x-asyncps-token: TOKEN``);
  compared with `hmac.compare_digest`. A call without it, or with a wrong one, ends with
  UNAUTHENTICATED before any handler runs, so it changes nothing. The only exception is the
  standard health service (``/grpc.health.v1.Health/``): container health checks must work
  without the secret, and it reveals no more than "serving or not". `asyncps health` sends the
  token anyway when it knows one, and speaks TLS when told to (environment above).

Clients attach the token with a client interceptor (it works on insecure and secure channels
alike; `grpc.metadata_call_credentials` would need TLS and costs a thread hop per call).

The token is never read from the YAML itself (the resolved YAML is copied into every run
directory): only from a file or an environment variable the YAML names.

Authorization by role (mTLS only; README "Security" has the trust model): the role is the client
certificate's common name, as `asyncps certs` writes it (CN=chief, worker, ps, client; the
older "asyncps ROLE" is read the same). `POLICY` says which roles may call which method: control
RPCs (Init, Pause, Resume, Snapshot, Restore, Stop) only the chief; data RPCs (RegisterWorker,
Pull, Push, PushPull and their unary forms; the chief's Register, Heartbeat, ReportMetrics) the
workers and the chief; Pull and Stats also the client (read-only tools); a method not in
`POLICY` only the chief. Any other call ends with PERMISSION_DENIED, naming the role and the
method, before the handler runs or its request is parsed. Health stays open. Without client
certificates (TLS only, token only) no caller has a role the server can check: every token holder
may call every method.

Every refusal (UNAUTHENTICATED: token; PERMISSION_DENIED: role) is counted per code in the
server's `Refusals` (the shard's and the chief's Prometheus metrics) and logged to stderr: the
first of each (code, role, method), then at most one line per LOG_EVERY_S with the count since.
A caller without a valid certificate under mTLS never makes a call: its handshake fails
(UNAVAILABLE on its side; gRPC logs "Handshake failed" on the server's), and nothing is counted.
"""
from __future__ import annotations

import logging
import hmac
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from asyncps.protos.wire_types import ConfigError

logger = logging.getLogger(__name__)
ROLES = ("ps", "worker", "chief", "client")
ENV_ROLE = "ASYNCPS_ROLE"  # picks the certificate of a process that TF_CONFIG does not name (tools, benchmarks)
TOKEN_KEY = "authorization"
ALT_TOKEN_KEY = "x-asyncps-token"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)  # health checks need no token (see the docstring)

ENV_DIR, ENV_CA, ENV_CERT, ENV_KEY = "ASYNCPS_TLS_DIR", "ASYNCPS_TLS_CA", "ASYNCPS_TLS_CERT", "ASYNCPS_TLS_KEY"
ENV_MTLS, ENV_TOKEN, ENV_TOKEN_FILE = "ASYNCPS_MTLS", "ASYNCPS_TOKEN", "ASYNCPS_TOKEN_FILE"


def cert_paths(directory: str | os.PathLike, role: str) -> tuple[Path, Path, Path]:
    """(ca, cert, key) paths of `role` in a folder written by `asyncps certs`."""
    d = Path(directory)
    return d / "ca.pem", d / f"{role}.pem", d / f"{role}-key.pem"


@dataclass(frozen=True)
class Security:
    """Resolved settings of one process: PEM bytes and the token, ready for gRPC."""

    tls: bool = False
    mtls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    server_name: str | None = None  # overrides the host name checked in the server certificate

    @property
    def enabled(self) -> bool:
        return self.tls or self.token is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.key is None or self.cert is None:  # e.g. settings from the environment without mTLS
            raise ConfigError("a TLS server needs its certificate and key (cluster.security cert and key or dir, "
                              "or ASYNCPS_TLS_DIR with ASYNCPS_MTLS left on)")
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.mtls)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.mtls:
            return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                                certificate_chain=self.cert)
        return grpc.ssl_channel_credentials(root_certificates=self.ca)

    def __repr__(self) -> str:  # never print the token or the key
        return (f"Security(tls={self.tls}, mtls={self.mtls}, token={'set' if self.token else None}, "
                f"server_name={self.server_name!r})")


INSECURE = Security()


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror}); make certificates with `asyncps certs DIR`") from None


def _read_token(text: str, where: str) -> str:
    token = text.strip()
    if not token:
        raise ConfigError(f"{where}: the job token is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{where}: the job token must be printable ASCII without spaces")
    return token


def resolve(section: Any = None, role: str | None = None) -> Security:
    """The Security of `role` from a `SecurityConfig` (None: from the environment).

    `role` picks the certificate (ps, worker, chief, client); None: this process's role from
    TF_CONFIG's task.type, else "client". Errors (missing file, unset token variable) raise
    ConfigError naming the key.
    """
    if isinstance(section, Security):
        return section
    role = role or process_role()
    if section is None:
        return _from_env(role)
    where = "cluster.security"
    token = None
    if section.token_file:
        token = _read_token(_read(section.token_file, f"{where}.token_file").decode("utf-8", "replace"),
                            f"{where}.token_file {section.token_file}")
    elif section.token_env:
        value = os.environ.get(section.token_env)
        if value is None:
            raise ConfigError(f"{where}.token_env: environment variable {section.token_env} is not set")
        token = _read_token(value, f"environment variable {section.token_env}")
    if not (section.tls or section.mtls):
        return Security(token=token)
    ca, cert, key = (section.ca, section.cert, section.key)
    if section.dir:
        d_ca, d_cert, d_key = cert_paths(section.dir, role)
        ca, cert, key = ca or d_ca, cert or d_cert, key or d_key
    missing = [name for name, value in (("ca", ca), ("cert", cert), ("key", key)) if not value]
    if missing:
        raise ConfigError(f"{where}: tls needs {', '.join(missing)} (or dir: a folder made by `asyncps certs`)")
    ca, cert, key = (str(p).replace("{role}", role) for p in (ca, cert, key))
    return Security(tls=True, mtls=bool(section.mtls), ca=_read(ca, f"{where}.ca"), cert=_read(cert, f"{where}.cert"),
                    key=_read(key, f"{where}.key"), token=token, server_name=section.server_name)


def _from_env(role: str) -> Security:
    env = os.environ
    token = None
    if env.get(ENV_TOKEN_FILE):
        token = _read_token(_read(env[ENV_TOKEN_FILE], ENV_TOKEN_FILE).decode("utf-8", "replace"), ENV_TOKEN_FILE)
    elif env.get(ENV_TOKEN):
        token = _read_token(env[ENV_TOKEN], ENV_TOKEN)
    ca: str | Path | None = env.get(ENV_CA)
    cert: str | Path | None = env.get(ENV_CERT)
    key: str | Path | None = env.get(ENV_KEY)
    if env.get(ENV_DIR):
        d_ca, d_cert, d_key = cert_paths(env[ENV_DIR], role)
        ca, cert, key = ca or d_ca, cert or (d_cert if d_cert.exists() else None), key or (d_key if d_key.exists() else None)
    if not ca:
        return Security(token=token)
    if cert and key and env.get(ENV_MTLS, "1") not in ("0", "false", ""):
        return Security(tls=True, mtls=True, ca=_read(ca, ENV_CA), token=token,
                        cert=_read(cert, ENV_CERT), key=_read(key, ENV_KEY))
    return Security(tls=True, ca=_read(ca, ENV_CA), token=token)


def process_role() -> str:
    """This process's role: ASYNCPS_ROLE, else TF_CONFIG's task.type, else "client"."""
    if os.environ.get(ENV_ROLE) in ROLES:
        return os.environ[ENV_ROLE]
    try:
        role = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {}).get("type")
    except (ValueError, AttributeError):
        role = None
    return role if role in ROLES else "client"


# ----------------------------------------------------------------------------------------------
# Clients


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call."""

    def __init__(self, token: str):
        self._entry = (TOKEN_KEY, f"Bearer {token}")

    def _details(self, d):
        metadata = list(d.metadata or ()) + [self._entry]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# gRPC waits 1 s before its first reconnection attempt and backs off to 120 s. Every role starts
# at once, so a worker's first call usually finds the chief not yet serving: it then idled about
# 0.8 s of a launch's 2.5 s start-up (measured, 2-core machine), and a worker whose shard was
# restarted could wait minutes. Retry quickly, and never more than 2 s apart: a refused
# connection on a LAN costs microseconds.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def open_channel(address: str, security: Any = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address`: TLS/mTLS and the token as `security` says (a SecurityConfig, a
    Security, or None: the environment; see the module docstring)."""
    sec = resolve(security)
    given = {name for name, _ in options}
    options = list(options) + [option for option in RECONNECT_OPTIONS if option[0] not in given]
    if sec.tls:
        if sec.server_name:
            options.append(("grpc.ssl_target_name_override", sec.server_name))
        channel = grpc.secure_channel(address, sec.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if sec.token is not None:
        channel = grpc.intercept_channel(channel, TokenClientInterceptor(sec.token))
    return channel


# ----------------------------------------------------------------------------------------------
# Servers


# Who may call what (module docstring). Roles are certificate common names (`role_of`).
CHIEF_ONLY = frozenset({"chief"})
DATA = frozenset({"chief", "worker"})
READ = frozenset({"chief", "worker", "client"})
_PS, _CHIEF = "/asyncps.ParameterServer/", "/asyncps.Chief/"
POLICY: dict[str, frozenset[str]] = {
    **{_PS + m: CHIEF_ONLY for m in ("Init", "Pause", "Resume", "Snapshot", "Restore", "Stop",
                                        "SnapshotTable", "RestoreTable")},
    **{_PS + m: DATA for m in ("RegisterWorker", "Push", "PushPull", "PushOne", "PushPullOne",
                                  "PushPullSession", "ShmOpen", "ShmPushPull")},
    **{_PS + m: READ for m in ("Pull", "PullOne", "Stats")},
    **{_CHIEF + m: DATA for m in ("Register", "Heartbeat", "ReportMetrics")},
}
LOG_EVERY_S = 10.0  # at most one refusal line per (code, role, method) this often
MAX_LOG_KEYS = 64  # distinct (code, role, method) lines tracked; beyond, one shared line per code


def allowed_roles(method: str) -> frozenset[str]:
    """Roles that may call `method` (a full "/package.Service/Method"); unknown: the chief only."""
    return POLICY.get(method, CHIEF_ONLY)


def role_of(common_name: str) -> str | None:
    """The role a certificate's common name names ("worker", or "asyncps worker" as older
    `asyncps certs` wrote it); None when it names none."""
    name = common_name[8:] if common_name.startswith("asyncps ") else common_name
    return name if name in ROLES else None


def peer_common_name(context) -> str | None:
    """The verified client certificate's common name (None without one: TLS only, plaintext)."""
    try:
        names: Sequence[bytes] = context.auth_context().get("x509_common_name") or ()
    except Exception:  # no auth context at all
        return None
    return names[0].decode("utf-8", "replace") if len(names) == 1 else None


class Refusals:
    """Calls a server refused, per status code; each logged (rate-limited) to stderr.

    `who` names the server in the log lines ("ps 0", "chief"). Thread-safe.
    """

    CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")

    def __init__(self, who: str = "server", stream=None):
        self.who = who
        self._stream = stream
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.CODES, 0)
        self._logged: dict[tuple, list] = {}  # (code, role, method) -> [last line time, refused since]

    def refuse(self, code: grpc.StatusCode, method: str, detail: str, peer: str = "?") -> None:
        now = time.monotonic()
        method, peer = _printable(method), _printable(peer)  # the caller chose them: one bounded line
        key = (code.name, detail, method)
        with self._lock:
            self._counts[code.name] = self._counts.get(code.name, 0) + 1
            if key not in self._logged and len(self._logged) >= MAX_LOG_KEYS:
                key = (code.name, "(more roles and methods)", "*")  # bounded memory under a flood of names
            entry = self._logged.get(key)
            if entry is None:
                entry = self._logged[key] = [now, 0]
                line, since = True, 0
            else:
                entry[1] += 1
                line, since = now - entry[0] >= LOG_EVERY_S, entry[1]
                if line:
                    entry[0], entry[1] = now, 0
        if line:
            more = f" ({since} refused like it since the last such line)" if since else ""
            message = f"asyncps {self.who}: refused {method} ({code.name}): {detail}, peer {peer}{more}"
            if self._stream is not None:  # a test's or tool's own stream
                print(message, file=self._stream, flush=True)
            else:
                logger.warning(message)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _printable(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit and text.isprintable() else ascii(text[:limit])


def refusal_family(refusals: Refusals, name: str, doc: str, labels: dict[str, str] | None = None):
    """A Prometheus counter family NAME{code, LABELS} of `refusals` (every code, zeros included)."""
    from prometheus_client.core import CounterMetricFamily

    labels = dict(labels or {})
    family = CounterMetricFamily(name, doc, labels=["code", *labels])
    for code, n in sorted(refusals.counts().items()):
        family.add_metric([code, *labels.values()], n)
    return family


def _rejecting_handler(handler, code: grpc.StatusCode, message: str, on_call=None):
    """A handler of the same kind as `handler` that ends the call with `code` at once
    (`on_call(context)` first, e.g. to count it).

    Requests are taken as raw bytes (no deserializer): nothing of them is parsed.
    """

    def unary(request, context):
        if on_call is not None:
            on_call(context)
        context.abort(code, message)

    def streaming(request, context):
        if on_call is not None:
            on_call(context)
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[req_stream, resp_stream](streaming if resp_stream else unary)


def _kind(handler) -> str:
    return ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Ends every call without the job token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, token: str, exempt: Sequence[str] = EXEMPT_PREFIXES, refusals: Refusals | None = None):
        self._token = token.encode()
        self._exempt = tuple(exempt)
        self.refusals = refusals if refusals is not None else Refusals()
        self.rejected = 0  # calls refused (read by tests and logs; updated without a lock: a count)

    def authorized(self, metadata) -> bool:
        offered = None
        for key, value in metadata or ():
            if key == TOKEN_KEY and isinstance(value, str) and value[:7].lower() == "bearer ":
                offered = value[7:].strip()
            elif key == ALT_TOKEN_KEY and isinstance(value, str):
                offered = value.strip()
            if offered is not None:
                break
        if offered is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "replace"), self._token)

    def intercept_service(self, continuation, details):
        if details.method.startswith(self._exempt):
            return continuation(details)
        if self.authorized(details.invocation_metadata):
            return continuation(details)
        self.rejected += 1
        method, code = details.method, grpc.StatusCode.UNAUTHENTICATED
        return _rejecting_handler(continuation(details), code,
                                  "missing or wrong job token (authorization: Bearer TOKEN)",
                                  lambda context: self.refusals.refuse(code, method, "missing or wrong job token",
                                                                       context.peer()))


class RoleInterceptor(grpc.ServerInterceptor):
    """mTLS: ends every call whose client certificate's role `POLICY` does not allow with
    PERMISSION_DENIED, before the handler runs or its request is parsed.

    The role is read inside the call (the auth context belongs to the call, not to the
    interceptor's HandlerCallDetails), so the handler is wrapped: one dict lookup per call.
    """

    def __init__(self, refusals: Refusals | None = None, exempt: Sequence[str] = EXEMPT_PREFIXES,
                 policy: dict[str, frozenset[str]] | None = None):
        self.refusals = refusals if refusals is not None else Refusals()
        self._exempt = tuple(exempt)
        self._policy = POLICY if policy is None else policy

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        allowed = self._policy.get(method, CHIEF_ONLY)
        refusals = self.refusals

        def check(context) -> None:
            name = peer_common_name(context)
            role = role_of(name) if name is not None else None
            if role in allowed:
                return
            who = (f"role {role}" if role else "no role") + f" (certificate CN={name!r})"
            refusals.refuse(grpc.StatusCode.PERMISSION_DENIED, method, who, context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method}: {who} may not call this method (allowed: {', '.join(sorted(allowed))})")

        kind = _kind(handler)
        behavior = getattr(handler, kind)
        if handler.response_streaming:
            def run(request, context):
                check(context)
                yield from behavior(request, context)
        else:
            def run(request, context):
                check(context)
                return behavior(request, context)
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(run, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def server_interceptors(sec: Security, refusals: Refusals | None = None) -> list[grpc.ServerInterceptor]:
    """The interceptors `sec` asks for: the token check (first, when there is a token), then the
    role check (mTLS); both count into `refusals`."""
    refusals = refusals if refusals is not None else Refusals()
    out: list[grpc.ServerInterceptor] = []
    if sec.token is not None:
        out.append(TokenServerInterceptor(sec.token, refusals=refusals))
    if sec.mtls:
        out.append(RoleInterceptor(refusals))
    return out


def add_port(server: grpc.Server, address: str, sec: Security) -> int:
    """Binds `address` with TLS or without, as `sec` says; the bound port (0: failed)."""
    try:
        if sec.tls:
            return server.add_secure_port(address, sec.server_credentials())
        return server.add_insecure_port(address)
    except RuntimeError:  # grpc raises for an address it cannot bind
        return 0
