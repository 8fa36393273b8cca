"""TLS, mutual TLS and the job token, with real shard servers on 127.0.0.1 (port 0).

Every rejected call is checked to change nothing: a pull with the right credentials before and
after shows the same values and version.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps.cli.certs import make_certs
from asyncps.cluster import bind_host, spec_for_launch
from asyncps.config import Config, SecurityConfig, from_dict
from asyncps.errors import ConfigError
from asyncps.protos import ps_pb2, security
from asyncps.protos.rpc import ps_stub
from asyncps.protos.security import Security, open_channel
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient, channel_options
from cli_runner import CONFIGS, report, run_ok

TOKEN = "s3cret-job-token"
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_certs(d)
    return d


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("other-certs")  # another job's CA
    make_certs(d)
    return d


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def make_cfg(**security_kw) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, 2, 5.0
    cfg.optimizer.learning_rate = 1.0
    cfg.cluster.security = SecurityConfig(**security_kw)
    return cfg


@pytest.fixture
def shard():
    """start(cfg) -> (server, address); servers stopped at the end."""
    made = []

    def start(cfg):
        server = ShardServer(cfg, 0)
        made.append(server)
        return server, f"127.0.0.1:{server.start()}"

    yield start
    for s in made:
        s.stop(0)


def client(address, cfg) -> PSClient:
    return PSClient([address], place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, 1), cfg)


def ready(address, cfg) -> PSClient:
    """A client with the server's own credentials, shard initialized, workers 0 and 1 registered."""
    c = client(address, cfg)
    c.init(PARAMS)
    c.register(0)
    c.register(1)
    return c


def grad():
    return {"w": np.ones((2, 3), np.float32), "b": np.full(3, 0.5, np.float32)}


# ----------------------------------------------------------------------------------------------
# TLS and mTLS


def test_tls_shard_serves_pull_and_push_end_to_end(shard, certs, token_file):
    cfg = make_cfg(tls=True, dir=str(certs), token_file=str(token_file))
    server, address = shard(cfg)
    assert server._role.security.tls and not server._role.security.mtls
    with ready(address, cfg) as c:
        assert c.push(grad(), [0], 0, 0)[0].result == "APPLIED"
        params, versions = c.pull()
        np.testing.assert_array_equal(params["w"], PARAMS["w"] - 1)
        np.testing.assert_array_equal(params["b"], np.full(3, -0.5, np.float32))
        assert versions == [1]
        # push_pull streams both ways through TLS too
        results, params, versions = c.push_pull(grad(), versions, 1, 0)
        assert results[0].result == "APPLIED" and versions == [2]
    # a plaintext client cannot talk to a TLS server
    plain = make_cfg(token_file=str(token_file))
    with client(address, plain) as c, pytest.raises(grpc.RpcError) as err:
        c.timeout = 2.0
        c.pull()
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_client_rejects_a_server_certificate_of_another_ca(shard, certs, other_certs):
    server, address = shard(make_cfg(tls=True, dir=str(certs)))
    with client(address, make_cfg(tls=True, dir=str(other_certs))) as c, pytest.raises(grpc.RpcError) as err:
        c.timeout = 2.0
        c.pull()
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_mtls_rejects_clients_without_a_valid_certificate_and_changes_nothing(shard, certs, other_certs, monkeypatch):
    cfg = make_cfg(mtls=True, dir=str(certs))
    server, address = shard(cfg)
    monkeypatch.setenv("ASYNCPS_ROLE", "chief")  # Init is the chief's (tests/test_authz.py)
    with ready(address, cfg) as good:
        good.push(grad(), [0], 0, 0)
        before, v_before = good.pull()
        ca = (certs / "ca.pem").read_bytes()
        strangers = {
            "no client certificate": Security(tls=True, ca=ca),
            "certificate of another CA": Security(tls=True, mtls=True, ca=ca,
                                                  cert=(other_certs / "worker.pem").read_bytes(),
                                                  key=(other_certs / "worker-key.pem").read_bytes()),
        }
        for what, sec in strangers.items():
            with open_channel(address, sec, channel_options()) as channel:
                stub = ps_stub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Stop(ps_pb2.StopRequest(grace=0.1), timeout=2.0)
                assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), what
                header = ps_pb2.PushHeader(worker=0, seq=5, read_version=1).SerializeToString()
                with pytest.raises(grpc.RpcError):
                    stub.Push(iter([b"\n" + bytes([len(header)]) + header]), timeout=2.0)
        after, v_after = good.pull()
        assert v_after == v_before and not server.stop_requested.is_set()
        for name in PARAMS:
            np.testing.assert_array_equal(after[name], before[name])
    # the certificate is the role's own: ASYNCPS_ROLE, else TF_CONFIG's task.type, else "client"
    assert security.process_role() == "chief"
    monkeypatch.delenv("ASYNCPS_ROLE")
    assert security.process_role() == "client"


# ----------------------------------------------------------------------------------------------
# The job token


def _every_call(stub):
    """One call of every ParameterServer method (unauthenticated attempts)."""
    header = ps_pb2.PushHeader(worker=0, seq=7, read_version=0).SerializeToString()
    push = [b"\n" + bytes([len(header)]) + header]
    return {
        "Init": lambda: stub.Init(iter([b""]), timeout=3),
        "RegisterWorker": lambda: stub.RegisterWorker(ps_pb2.RegisterWorkerRequest(worker=1, retire=True), timeout=3),
        "Pull": lambda: list(stub.Pull(ps_pb2.PullRequest(), timeout=3)),
        "Push": lambda: stub.Push(iter(push), timeout=3),
        "PushPull": lambda: list(stub.PushPull(iter(push), timeout=3)),
        "Pause": lambda: stub.Pause(ps_pb2.PauseRequest(), timeout=3),
        "Resume": lambda: stub.Resume(ps_pb2.ResumeRequest(), timeout=3),
        "Snapshot": lambda: list(stub.Snapshot(ps_pb2.SnapshotRequest(), timeout=3)),
        "Restore": lambda: stub.Restore(iter([b""]), timeout=3),
        "Stats": lambda: stub.Stats(ps_pb2.StatsRequest(), timeout=3),
        "Stop": lambda: stub.Stop(ps_pb2.StopRequest(grace=0.1), timeout=3),
    }


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_missing_or_wrong_token_is_unauthenticated_and_changes_nothing(shard, certs, token_file, tls):
    extra = {"tls": True, "dir": str(certs)} if tls else {}
    cfg = make_cfg(token_file=str(token_file), **extra)
    server, address = shard(cfg)
    base = Security(tls=tls, ca=(certs / "ca.pem").read_bytes() if tls else None)
    with ready(address, cfg) as good:
        good.push(grad(), [0], 0, 0)
        before, v_before = good.pull()
        stats_before = good.stats()[0]
        attempts = {
            "no token": base,
            "wrong token": Security(tls=base.tls, ca=base.ca, token=TOKEN + "x"),
            "token prefix": Security(tls=base.tls, ca=base.ca, token=TOKEN[:-1]),
        }
        tried = 0
        for what, sec in attempts.items():
            with open_channel(address, sec, channel_options()) as channel:
                for method, call in _every_call(ps_stub(channel)).items():
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (what, method, err.value)
                    tried += 1
                # health checks need no token (compose healthchecks)
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert tried == 33 and server._role.interceptors[0].rejected == 33
        after, v_after = good.pull()
        assert v_after == v_before and not server.stop_requested.is_set()
        for name in PARAMS:
            np.testing.assert_array_equal(after[name], before[name])
        stats_after = good.stats()[0]
        assert stats_after.version == stats_before.version and not stats_after.paused
        assert [w.active for w in stats_after.workers] == [True, True]
        assert stats_after.rejected_unknown == stats_before.rejected_unknown


def test_token_in_either_header_is_accepted(shard, token_file):
    server, address = shard(make_cfg(token_file=str(token_file)))
    with grpc.insecure_channel(address) as channel:
        stub = ps_stub(channel)
        for metadata in ([("authorization", f"Bearer {TOKEN}")], [("authorization", f"bearer {TOKEN}")],
                         [("x-asyncps-token", TOKEN)]):
            assert stub.Stats(ps_pb2.StatsRequest(), timeout=3, metadata=metadata).mode == "async"
        with pytest.raises(grpc.RpcError) as err:
            stub.Stats(ps_pb2.StatsRequest(), timeout=3, metadata=[("authorization", TOKEN)])  # no "Bearer"
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_from_environment_variable_and_clear_errors(monkeypatch, tmp_path, certs):
    monkeypatch.setenv("JOB_TOKEN", TOKEN)
    assert security.resolve(SecurityConfig(token_env="JOB_TOKEN")).token == TOKEN
    monkeypatch.delenv("JOB_TOKEN")
    with pytest.raises(ConfigError, match="JOB_TOKEN is not set"):
        security.resolve(SecurityConfig(token_env="JOB_TOKEN"))
    with pytest.raises(ConfigError, match="cluster.security.token_file"):
        security.resolve(SecurityConfig(token_file=str(tmp_path / "nope")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        security.resolve(SecurityConfig(token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="tls needs dir"):
        from_dict({"cluster": {"security": {"tls": True}}})
    with pytest.raises(ConfigError, match="cluster.security.cert"):
        security.resolve(SecurityConfig(tls=True, ca=str(certs / "ca.pem"), cert=str(tmp_path / "x.pem"),
                                        key=str(tmp_path / "x-key.pem")))
    # explicit paths with {role}; mtls implies tls; the token never appears in repr
    cfg = from_dict({"cluster": {"security": {"mtls": True, "ca": str(certs / "ca.pem"),
                                              "cert": str(certs / "{role}.pem"), "key": str(certs / "{role}-key.pem")}}})
    sec = security.resolve(cfg.cluster.security, "ps")
    assert sec.tls and sec.mtls and sec.cert == (certs / "ps.pem").read_bytes()
    assert TOKEN not in repr(Security(token=TOKEN))


def test_process_role_comes_from_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}, "task": {"type": "worker", "index": 0}}))
    assert security.process_role() == "worker"
    monkeypatch.setenv("TF_CONFIG", "not json")
    assert security.process_role() == "client"


def test_health_command_speaks_tls_and_sends_the_token(shard, certs, token_file):
    server, address = shard(make_cfg(mtls=True, dir=str(certs), token_file=str(token_file)))
    env = dict(os.environ, ASYNCPS_TLS_DIR=str(certs), ASYNCPS_TOKEN_FILE=str(token_file))
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", "health", address], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stderr
    env.pop("ASYNCPS_TLS_DIR")
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", "health", address, "--timeout", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1


def test_certs_command_writes_every_role_with_private_keys(tmp_path):
    d = tmp_path / "c"
    proc = run_ok("certs", d, "--hosts", "trainer.internal", "10.1.2.3", "--ps", "3")
    assert "wrote 10 files" in proc.stdout
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "ps.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(map(str, sans.get_values_for_type(x509.DNSName))) | set(map(str, sans.get_values_for_type(x509.IPAddress)))
    assert {"127.0.0.1", "localhost", "chief", "ps0", "ps2", "trainer.internal", "10.1.2.3"} <= names
    assert "ps3" not in names
    assert (d / "worker-key.pem").stat().st_mode & 0o077 == 0
    again = subprocess.run([sys.executable, "-m", "asyncps.cli", "certs", str(d)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr


def test_launch_binds_servers_to_loopback_by_default():
    spec = spec_for_launch(Config())
    hosts = {a.rsplit(":", 1)[0] for a in (spec.chief, *spec.ps)}
    assert hosts == {"127.0.0.1"} and bind_host("127.0.0.1") == "127.0.0.1"
    assert bind_host("ps0") == "0.0.0.0"  # a compose service name: all interfaces of the container


@pytest.mark.slow
def test_launch_linear_with_mtls_and_token(tmp_path, certs, token_file, monkeypatch):
    # The worker's ChiefClient takes its settings from the environment until worker/main.py passes
    # cfg.cluster.security to it; every other channel and server reads cluster.security.
    monkeypatch.setenv("ASYNCPS_TLS_DIR", str(certs))
    monkeypatch.setenv("ASYNCPS_TOKEN_FILE", str(token_file))
    run_ok("launch", CONFIGS / "linear_regression.yaml", f"run_dir={tmp_path}", "train.max_steps=200",
           "cluster.security.mtls=true", f"cluster.security.dir={certs}", f"cluster.security.token_file={token_file}",
           timeout=180)
    rep = report(tmp_path)
    assert rep["config"]["cluster"]["security"]["mtls"] is True
    text = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert TOKEN not in text and TOKEN not in (tmp_path / "config.yaml").read_text()
    assert "serving on 127.0.0.1:" in text
    assert "refused" not in text  # every role's calls are allowed by its own certificate (test_authz.py)


def test_channels_reconnect_quickly_unless_the_caller_says_otherwise(monkeypatch):
    seen = []
    monkeypatch.setattr(security.grpc, "insecure_channel", lambda address, options: seen.append(dict(options)))
    open_channel("127.0.0.1:1", Security())
    open_channel("127.0.0.1:1", Security(), options=[("grpc.initial_reconnect_backoff_ms", 5000)])
    assert seen[0]["grpc.initial_reconnect_backoff_ms"] == 50 and seen[0]["grpc.max_reconnect_backoff_ms"] == 2000
    assert seen[1]["grpc.initial_reconnect_backoff_ms"] == 5000
