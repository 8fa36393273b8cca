"""A shard as a real OS process: started from the command line on port 0, found through its port
file, healthy, and gone with exit code 0 after SIGTERM."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps.config import Config
from asyncps.partition import place
from asyncps.ps_client import PSClient


def _wait_for(path: Path, proc, deadline_s=20.0) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists():
            return path.read_text().strip()
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {deadline_s} s")


def _start(tmp_path, index=0):
    config = tmp_path / "run.yaml"
    config.write_text("cluster:\n  ps: 2\n  workers: 1\n")
    port_file = tmp_path / f"ps{index}.port"
    argv = [sys.executable, "-m", "asyncps.ps.server", str(config), "--index", str(index), "--port", "0",
            "--port-file", str(port_file), "optimizer.learning_rate=0.5"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, int(_wait_for(port_file, proc))


def test_shard_process_serves_reports_health_and_stops_on_sigterm(tmp_path):
    proc, port = _start(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="asyncps.ParameterServer"), timeout=10, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        cfg = Config()
        cfg.cluster.ps = 1
        client = PSClient([f"127.0.0.1:{port}"], place({"w": ((2,), "float32")}, 1), cfg)
        client.init({"w": np.ones(2, np.float32)})
        client.register(0)
        client.push({"w": np.ones(2, np.float32)}, [0], 0, 0)
        params, versions = client.pull()
        np.testing.assert_array_equal(params["w"], [0.5, 0.5])  # the override reached the shard
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM, out  # stopped by a signal, not by the chief: restartable
        assert f"serving on 127.0.0.1:{port}" in out and "stopped at version 1" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_rpc_ends_the_process_and_bad_index_is_one_clear_line(tmp_path):
    proc, port = _start(tmp_path, index=1)
    cfg = Config()
    cfg.cluster.ps = 1
    client = PSClient([f"127.0.0.1:{port}"], place({}, 1), cfg)
    client.stop(grace=1.0)
    client.close()
    assert proc.wait(timeout=20) == 0
    bad = subprocess.run([sys.executable, "-m", "asyncps.ps.server", str(tmp_path / "run.yaml"), "--index", "5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--index 5" in bad.stderr
