"""Authorization by role under mutual TLS (README "Security", the trust model), with real shard
and chief servers on 127.0.0.1 (port 0) and certificates from `asyncps certs`.

The role is the client certificate's common name (CN=chief, worker, ps, client). Control RPCs
(Init, Pause, Resume, Snapshot, Restore, Stop) are the chief's; data RPCs (RegisterWorker, Pull,
Push, PushPull and their unary forms; the chief's Register, Heartbeat, ReportMetrics) the
workers' and the chief's; Stats and Pull also the client's (tools, read-only); health is open.
A refused call ends with PERMISSION_DENIED naming the role and the method, changes nothing, and
is counted (per code) in the server's refusals and its Prometheus metrics.
"""
from __future__ import annotations

import copy
import datetime as dt
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps.chief.membership import Membership
from asyncps.chief.servicer import SERVICE_NAME as CHIEF_SERVICE, ChiefServicer
from asyncps.cli.certs import make_certs
from asyncps.config import Config, SecurityConfig
from asyncps.protos import chief_pb2, chief_pb2_grpc, ps_pb2, security
from asyncps.protos.rpc import ps_stub
from asyncps.protos.security import Security, open_channel
from asyncps.protos.serving import RoleServer
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient, channel_options

TOKEN = "authz-job-token"
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
CONTROL = ("Init", "Pause", "Resume", "Snapshot", "Restore", "Stop")
DATA = ("RegisterWorker", "Pull", "Push", "PushPull", "PullOne", "PushOne", "PushPullOne", "PushPullSession")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return path


def make_cfg(certs, token_file, **kw) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, 2, 5.0
    cfg.optimizer.learning_rate = 1.0
    settings = {"mtls": True, "dir": str(certs), "token_file": str(token_file)}
    settings.update(kw)
    cfg.cluster.security = SecurityConfig(**settings)
    return cfg


def as_role(cfg: Config, role: str) -> Security:
    """The credentials `role` would use (its certificate from the folder, the job token)."""
    return security.resolve(cfg.cluster.security, role)


@pytest.fixture
def shard(certs, token_file):
    """(server, address, cfg): one mTLS + token shard, initialized by the chief's certificate,
    workers 0 and 1 registered and one push applied."""
    cfg = make_cfg(certs, token_file)
    server = ShardServer(cfg, 0)
    address = f"127.0.0.1:{server.start()}"
    with role_client(address, cfg, "chief") as chief:
        chief.init(PARAMS)
        chief.register(0)
        chief.register(1)
        chief.push(grad(), [0], 0, 0)
    yield server, address, cfg
    server.stop(0)


def role_client(address, cfg, role) -> PSClient:
    """A PSClient presenting `role`'s certificate (a resolved Security stands for the section)."""
    mine = copy.deepcopy(cfg)
    mine.cluster.security = as_role(cfg, role)
    return PSClient([address], place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, 1), mine)


def grad():
    return {"w": np.ones((2, 3), np.float32), "b": np.full(3, 0.5, np.float32)}


def state(address, cfg):
    """(values, versions, stats) as the chief sees them."""
    with role_client(address, cfg, "chief") as c:
        values, versions = c.pull()
        return values, versions, c.stats()[0]


def push_message(worker=0, seq=9, read_version=1) -> bytes:
    header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version).SerializeToString()
    return b"\n" + bytes([len(header)]) + header


def every_call(stub, snapshot_bytes: bytes = b""):
    """One call of every ParameterServer method, raw enough that no handler needs valid data to be
    reached (a refused call never parses its request)."""
    return {
        "Init": lambda: stub.Init(iter([b""]), timeout=3),
        "Pause": lambda: stub.Pause(ps_pb2.PauseRequest(), timeout=3),
        "Resume": lambda: stub.Resume(ps_pb2.ResumeRequest(), timeout=3),
        "Snapshot": lambda: list(stub.Snapshot(ps_pb2.SnapshotRequest(), timeout=3)),
        "Restore": lambda: stub.Restore(iter([snapshot_bytes]), timeout=3),
        "Stop": lambda: stub.Stop(ps_pb2.StopRequest(grace=0.1), timeout=3),
        "RegisterWorker": lambda: stub.RegisterWorker(ps_pb2.RegisterWorkerRequest(worker=1, retire=True), timeout=3),
        "Pull": lambda: list(stub.Pull(ps_pb2.PullRequest(), timeout=3)),
        "Push": lambda: stub.Push(iter([push_message()]), timeout=3),
        "PushPull": lambda: list(stub.PushPull(iter([push_message()]), timeout=3)),
        "PullOne": lambda: stub.PullOne(ps_pb2.PullRequest(), timeout=3),
        "PushOne": lambda: stub.PushOne(push_message(), timeout=3),
        "PushPullOne": lambda: stub.PushPullOne(push_message(), timeout=3),
        "PushPullSession": lambda: list(stub.PushPullSession(iter([push_message()]), timeout=3)),
        "Stats": lambda: stub.Stats(ps_pb2.StatsRequest(), timeout=3),
    }


def assert_unchanged(before, after):
    values0, versions0, stats0 = before
    values1, versions1, stats1 = after
    assert versions1 == versions0 and stats1.version == stats0.version
    assert not stats1.paused
    assert [(w.worker, w.active, w.applied, w.last_seq) for w in stats1.workers] == \
        [(w.worker, w.active, w.applied, w.last_seq) for w in stats0.workers]
    for name in PARAMS:
        np.testing.assert_array_equal(values1[name], values0[name])


# ----------------------------------------------------------------------------------------------
# Certificates carry the role


def test_certs_put_the_role_in_the_common_name(certs):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    for role in ("chief", "worker", "ps", "client"):
        cert = x509.load_pem_x509_certificate((certs / f"{role}.pem").read_bytes())
        assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [role]
    assert security.role_of("chief") == "chief" and security.role_of("asyncps worker") == "worker"  # older certs
    assert security.role_of("mallory") is None and security.role_of("") is None


def test_policy_names_every_method_of_both_services():
    ps_methods = {m.name for m in ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].methods}
    chief_methods = {m.name for m in chief_pb2.DESCRIPTOR.services_by_name["Chief"].methods}
    named = set(security.POLICY)
    assert {f"/asyncps.ParameterServer/{m}" for m in ps_methods} <= named
    assert {f"/asyncps.Chief/{m}" for m in chief_methods} <= named
    for m in CONTROL:
        assert security.allowed_roles(f"/asyncps.ParameterServer/{m}") == {"chief"}
    for m in DATA:
        assert {"chief", "worker"} <= security.allowed_roles(f"/asyncps.ParameterServer/{m}")
        assert "ps" not in security.allowed_roles(f"/asyncps.ParameterServer/{m}")
    assert security.allowed_roles("/asyncps.ParameterServer/NewControlRpc") == {"chief"}  # default: deny


# ----------------------------------------------------------------------------------------------
# The shard


def test_worker_certificate_cannot_pause_stop_restore_and_changes_nothing(shard):
    server, address, cfg = shard
    before = state(address, cfg)
    with role_client(address, cfg, "chief") as chief:
        snapshot = chief.snapshot()  # a valid Restore stream, so only the role stops it
    from asyncps.protos import codec

    restore_stream = list(codec.encode_snapshot(snapshot[0], codec.CHUNK_BYTES))
    with open_channel(address, as_role(cfg, "worker"), channel_options()) as channel:
        stub = ps_stub(channel)
        calls = every_call(stub)
        calls["Restore"] = lambda: stub.Restore(iter(restore_stream), timeout=3)
        for method in CONTROL:
            with pytest.raises(grpc.RpcError) as err:
                calls[method]()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.value)
            assert "worker" in err.value.details() and method in err.value.details(), err.value.details()
    assert not server.stop_requested.is_set()
    assert_unchanged(before, state(address, cfg))
    assert server._role.refusals.counts()["PERMISSION_DENIED"] == len(CONTROL)
    # still serving, not paused: the worker's own data calls go through
    with role_client(address, cfg, "worker") as w:
        assert w.push(grad(), before[1], 0, 1)[0].result == "APPLIED"


def test_worker_certificate_serves_the_data_path(shard):
    server, address, cfg = shard
    with role_client(address, cfg, "worker") as w:
        assert len(w.register(1)) == 1
        params, versions = w.pull(worker=1)
        assert w.push(grad(), versions, 1, 0)[0].result == "APPLIED"
        results, params, versions = w.push_pull(grad(), versions, 1, 1)
        assert results[0].result == "APPLIED" and versions == [3]
        assert w.stats()[0].version == 3
    assert server._role.refusals.counts() == {"UNAUTHENTICATED": 0, "PERMISSION_DENIED": 0}


def test_chief_certificate_can_call_every_control_rpc(shard):
    server, address, cfg = shard
    with role_client(address, cfg, "chief") as chief:
        assert chief.pause() == [1]
        snapshots = chief.snapshot()
        assert chief.resume() == [1]
        chief.push(grad(), [1], 0, 1)
        assert chief.restore(snapshots) == [1]  # back to the snapshot's version
        assert chief.init(PARAMS) == [False]  # same specs: a no-op
        chief.stop(grace=0.1)
    assert server.stop_requested.is_set()
    assert server._role.refusals.counts()["PERMISSION_DENIED"] == 0


@pytest.mark.parametrize("role,allowed", [("ps", set()), ("client", {"Pull", "PullOne", "Stats"})])
def test_ps_and_client_certificates_get_only_their_share(shard, role, allowed):
    server, address, cfg = shard
    before = state(address, cfg)
    denied = 0
    with open_channel(address, as_role(cfg, role), channel_options()) as channel:
        for method, call in every_call(ps_stub(channel)).items():
            if method in allowed:
                call()
                continue
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, method, err.value)
            assert role in err.value.details() and method in err.value.details()
            denied += 1
        # health stays open to everyone
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert denied == 15 - len(allowed)
    assert not server.stop_requested.is_set()
    assert_unchanged(before, state(address, cfg))
    assert server._role.refusals.counts()["PERMISSION_DENIED"] == denied


def test_certificate_without_a_role_is_refused_everything_but_health(shard, certs, tmp_path):
    server, address, cfg = shard
    cert, key = _sign(certs, "mallory", tmp_path)
    sec = Security(tls=True, mtls=True, ca=(certs / "ca.pem").read_bytes(), cert=cert, key=key, token=TOKEN)
    before = state(address, cfg)
    with open_channel(address, sec, channel_options()) as channel:
        for method, call in every_call(ps_stub(channel)).items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.value)
            assert "mallory" in err.value.details() and method in err.value.details()
    assert_unchanged(before, state(address, cfg))
    assert not server.stop_requested.is_set()


def test_refused_calls_are_counted_per_code_logged_and_in_the_shards_metrics(shard, caplog):
    server, address, cfg = shard
    worker = as_role(cfg, "worker")
    no_token = Security(tls=True, mtls=True, ca=worker.ca, cert=worker.cert, key=worker.key)
    with open_channel(address, no_token, channel_options()) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                ps_stub(channel).Pause(ps_pb2.PauseRequest(), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the token is checked first
    with open_channel(address, worker, channel_options()) as channel:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                ps_stub(channel).Stop(ps_pb2.StopRequest(), timeout=3)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert server._role.refusals.counts() == {"UNAUTHENTICATED": 3, "PERMISSION_DENIED": 2}
    assert server._role.interceptors[0].rejected == 3  # the token interceptor's own count, as before

    err_text = caplog.text
    assert "ps 0: refused /asyncps.ParameterServer/Stop (PERMISSION_DENIED): role worker" in err_text, err_text
    assert "ps 0: refused /asyncps.ParameterServer/Pause (UNAUTHENTICATED)" in err_text
    assert TOKEN not in err_text

    from prometheus_client import CollectorRegistry, generate_latest

    from asyncps.ps.metrics import refusal_families
    from asyncps.telemetry import FunctionCollector

    registry = CollectorRegistry()
    registry.register(FunctionCollector(lambda: refusal_families(server._role.refusals, 0)))
    text = generate_latest(registry).decode()
    assert 'asyncps_ps_refused_calls_total{code="PERMISSION_DENIED",shard="0"} 2.0' in text, text
    assert 'asyncps_ps_refused_calls_total{code="UNAUTHENTICATED",shard="0"} 3.0' in text, text


def test_a_refusal_storm_is_logged_in_a_bounded_number_of_lines(shard, caplog):
    server, address, cfg = shard
    with open_channel(address, as_role(cfg, "worker"), channel_options()) as channel:
        stub = ps_stub(channel)
        for _ in range(50):
            with pytest.raises(grpc.RpcError):
                stub.Pause(ps_pb2.PauseRequest(), timeout=3)
    assert server._role.refusals.counts()["PERMISSION_DENIED"] == 50
    lines = [ln for ln in caplog.text.splitlines() if "refused" in ln]
    assert 1 <= len(lines) <= 2, lines


def test_refusals_of_made_up_method_names_keep_the_log_bounded(shard, caplog):
    server, address, cfg = shard
    worker = as_role(cfg, "worker")
    no_token = Security(tls=True, mtls=True, ca=worker.ca, cert=worker.cert, key=worker.key)
    with open_channel(address, no_token, channel_options()) as channel:
        for i in range(100):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/evil.Service/M{i}\x1b[2J")(b"", timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server._role.refusals.counts()["UNAUTHENTICATED"] == 100
    lines = [ln for ln in caplog.text.splitlines() if "refused" in ln]
    assert len(lines) <= security.MAX_LOG_KEYS + 1, len(lines)
    assert not any("\x1b" in ln for ln in lines)  # no control characters reach the log


def test_without_a_client_certificate_the_handshake_fails_and_no_call_is_seen(shard):
    """What README says: under mTLS a caller without a valid certificate sees UNAVAILABLE (the
    TLS handshake fails before any call exists), the server counts nothing (it never sees a call;
    gRPC's own log has a handshake error line)."""
    server, address, cfg = shard
    ca = as_role(cfg, "chief").ca
    with open_channel(address, Security(tls=True, ca=ca, token=TOKEN), channel_options()) as channel:
        with pytest.raises(grpc.RpcError) as err:
            ps_stub(channel).Stop(ps_pb2.StopRequest(grace=0.1), timeout=2.0)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert server._role.refusals.counts() == {"UNAUTHENTICATED": 0, "PERMISSION_DENIED": 0}
    assert not server.stop_requested.is_set()


@pytest.mark.parametrize("mode", ["tls", "token"])
def test_tls_only_and_token_only_cannot_tell_roles_apart(certs, token_file, mode):
    """The documented limit: without client certificates every token holder is every role."""
    kw = {"mtls": False, "tls": True} if mode == "tls" else {"mtls": False, "tls": False, "dir": None}
    cfg = make_cfg(certs, token_file, **kw)
    server = ShardServer(cfg, 0)
    address = f"127.0.0.1:{server.start()}"
    try:
        with PSClient([address], place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, 1), cfg) as c:
            c.init(PARAMS)
            assert c.pause() == [0]
            assert c.resume() == [0]
        assert server._role.refusals.counts()["PERMISSION_DENIED"] == 0
    finally:
        server.stop(0)


# ----------------------------------------------------------------------------------------------
# The chief


@pytest.fixture
def chief_server(certs, token_file):
    cfg = make_cfg(certs, token_file)
    membership = Membership(2, 30.0)
    stop = threading.Event()
    role = RoleServer("chief", "127.0.0.1", 0, (CHIEF_SERVICE,), max_workers=8, security=cfg.cluster.security)
    chief_pb2_grpc.add_ChiefServicer_to_server(ChiefServicer(membership, stop, ["127.0.0.1:1"], 0, lambda: 0), role.server)
    address = f"127.0.0.1:{role.start()}"
    yield role, address, cfg, membership
    role.stop(0)


def test_chief_service_takes_workers_and_refuses_other_roles(chief_server):
    role, address, cfg, membership = chief_server
    with open_channel(address, as_role(cfg, "worker"), channel_options()) as channel:
        stub = chief_pb2_grpc.ChiefStub(channel)
        reply = stub.Register(chief_pb2.RegisterRequest(hostname="h", pid=1), timeout=3)
        assert stub.Heartbeat(chief_pb2.HeartbeatRequest(worker_index=reply.worker_index, step=1), timeout=3)
    for who in ("ps", "client"):
        with open_channel(address, as_role(cfg, who), channel_options()) as channel:
            stub = chief_pb2_grpc.ChiefStub(channel)
            for name, call in (("Register", lambda: stub.Register(chief_pb2.RegisterRequest(hostname="x", pid=2), timeout=3)),
                               ("Heartbeat", lambda: stub.Heartbeat(chief_pb2.HeartbeatRequest(worker_index=0, step=5), timeout=3)),
                               ("ReportMetrics", lambda: stub.ReportMetrics(chief_pb2.MetricsReport(worker_index=0), timeout=3))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (who, name)
                assert who in err.value.details() and name in err.value.details()
    assert [(m.hostname, m.pid) for m in membership.alive()] == [("h", 1)]
    assert role.refusals.counts()["PERMISSION_DENIED"] == 6


def test_chief_metrics_show_refused_calls(chief_server):
    role, address, cfg, membership = chief_server
    with open_channel(address, as_role(cfg, "ps"), channel_options()) as channel:
        with pytest.raises(grpc.RpcError):
            chief_pb2_grpc.ChiefStub(channel).Register(chief_pb2.RegisterRequest(hostname="x", pid=2), timeout=3)
    from prometheus_client import CollectorRegistry, generate_latest

    from asyncps.chief.telemetry import refusal_families
    from asyncps.telemetry import FunctionCollector

    registry = CollectorRegistry()
    registry.register(FunctionCollector(lambda: refusal_families(role.refusals)))
    text = generate_latest(registry).decode()
    assert 'asyncps_chief_refused_calls_total{code="PERMISSION_DENIED"} 1.0' in text, text


# ----------------------------------------------------------------------------------------------


def _sign(certs, common_name: str, tmp_path) -> tuple[bytes, bytes]:
    """A certificate of the job's CA whose CN names no role (what a stolen ca-key.pem could make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
