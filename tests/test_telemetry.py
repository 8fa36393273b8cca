"""Telemetry: exact interval staleness, pull-to-push windows, the staleness-recording switch, a
real shard's Prometheus /metrics scraped over HTTP, TensorBoard event files read back, and a
cluster run whose telemetry rows add up to its report."""
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from asyncps.chief.telemetry import RunTelemetry
from asyncps.config import Config
from asyncps.ps import counters
from asyncps.ps.counters import HIST_BUCKETS, WorkerCounters, total_histogram
from asyncps.ps.servicer import ParameterServerServicer
from asyncps.ps.shard import Shard
from asyncps.runs import MetricsLog, read_metrics
from asyncps.telemetry import (
    DURATION_BUCKETS_MS,
    DurationStats,
    DurationWindow,
    cumulative_buckets,
    duration_bucket,
    histogram_delta,
    metrics_port,
)
from cli_runner import CONFIGS, report, run_ok
from conftest import PLAIN_LINEAR_STEPS


def _needs(module: str):
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed (pip install -e '.[telemetry]')")


# ----------------------------------------------------------------------------------------------
# Pure pieces


def test_duration_buckets_bound_every_value_within_12_percent():
    for ms in (0.01, 0.1, 0.37, 1.0, 12.5, 999.0, 99_999.0):
        i = duration_bucket(ms)
        assert ms <= DURATION_BUCKETS_MS[i] <= max(ms, DURATION_BUCKETS_MS[0]) * 1.123
    assert duration_bucket(1e9) == len(DURATION_BUCKETS_MS)


def test_duration_windows_merge_exactly_and_quantiles_come_from_buckets(rng):
    seconds = rng.lognormal(np.log(0.004), 0.5, size=1000)
    a, b = DurationWindow(), DurationWindow()
    for i, s in enumerate(seconds):
        (a if i % 2 else b).add(float(s))
    stats = DurationStats()
    assert stats.add_window(a.flush()) and stats.add_window(b.flush())
    assert not stats.add_window(a.flush())  # flushed: empty
    ms = np.sort(seconds) * 1e3
    s = stats.summary()
    assert s["count"] == 1000 and s["mean_ms"] == pytest.approx(ms.mean(), rel=1e-3)
    assert s["max_ms"] == pytest.approx(ms[-1], rel=1e-3)
    for key, q in (("p50_ms", 50), ("p99_ms", 99)):
        exact = ms[int(np.ceil(q / 100 * 1000)) - 1]
        assert exact <= s[key] * (1 + 1e-3) and s[key] <= exact * 1.123


@pytest.mark.parametrize("bad", [
    {"pull_to_push/count": float("nan")}, {"pull_to_push/count": 2.0, "pull_to_push/b/x": 2.0},
    {"pull_to_push/count": 2.0, "pull_to_push/b/3": 1.0}, {"pull_to_push/count": 1.0, "pull_to_push/b/999": 1.0},
    {"pull_to_push/count": 1.0, "pull_to_push/b/3": 1.0, "pull_to_push/sum_ms": float("inf")},
    {"pull_to_push/count": 1e300, "pull_to_push/b/3": 1e300}])
def test_a_malformed_window_from_the_wire_changes_nothing(bad):
    stats = DurationStats()
    assert not stats.add_window(bad) and stats.summary() == {"count": 0}


def test_histogram_delta_and_prometheus_buckets():
    assert histogram_delta({0: 5, 3: 2}, {0: 4}) == {0: 1, 3: 2}
    assert histogram_delta({0: 2}, {0: 4, 1: 1}) == {0: 2}  # counts went down: a restarted shard
    assert cumulative_buckets({0: 3, 2: 1, 100: 1}) == [
        ("0.0", 3), ("1.0", 3), ("2.0", 4), ("4.0", 4), ("8.0", 4), ("16.0", 4), ("32.0", 4), ("64.0", 4), ("+Inf", 5)]
    assert [metrics_port(9000, r, i, 2) for r, i in (("chief", 0), ("ps", 1), ("worker", 0))] == [9000, 9002, 9003]
    assert metrics_port(0, "ps", 1, 2) == 0


def test_recording_switch_keeps_counts_and_total_histogram_matches_the_naive_sum():
    workers = [WorkerCounters(i) for i in range(3)]
    for i, w in enumerate(workers):
        for s in (0, 1, 1, 7 * i, 5000):
            w.record_applied(s)
    naive = [sum(w.histogram[s] for w in workers) for s in range(HIST_BUCKETS)]
    while naive[-1] == 0:
        naive.pop()
    assert total_histogram(workers) == naive and workers[2].trimmed_histogram()[-1] == 1
    try:
        counters.set_recording(False)
        assert not counters.recording()
        w = WorkerCounters(9)
        w.record_applied(4)
        assert w.applied == 1 and w.staleness_sum == 0 and w.trimmed_histogram() == []
    finally:
        counters.set_recording(True)
    assert counters.recording()


# ----------------------------------------------------------------------------------------------
# Chief rows and TensorBoard from a real shard's StatsReply


def _stats(shard):
    return [ParameterServerServicer(shard).Stats(None, None)]


def _push(shard, worker, seq, read_version):
    shard.push(worker, seq, read_version, {"w": np.ones(2, np.float32)})


def _read_events(folder: Path) -> list:
    """Every Event of the event files in `folder` (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + n]))
            at += 12 + n + 4
    return events


def test_rows_carry_the_staleness_of_each_interval_per_shard_and_worker_and_go_to_tensorboard(tmp_path):
    _needs("tensorboardX")
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers = 1, 2
    cfg.telemetry.tensorboard, cfg.telemetry.every_seconds = True, 0.0
    shard = Shard(cfg, 0)
    shard.init({"w": np.zeros(2, np.float32)})
    shard.register_worker(0)
    shard.register_worker(1)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    tel = RunTelemetry(cfg, tmp_path, log)
    tel.baseline(0, _stats(shard))
    _push(shard, 0, 0, 0)  # staleness 0
    _push(shard, 1, 0, 0)  # staleness 1
    window = DurationWindow()
    window.add(0.002)
    window.add(0.004)
    kept = tel.worker_report(1, {"train/loss": 0.5, **window.flush()})
    assert kept["pull_to_push/count"] == 2 and kept["pull_to_push/p99_ms"] == 4.0
    assert not any("/b/" in k for k in kept)
    first = tel.row(2, _stats(shard))
    _push(shard, 1, 1, 0)  # staleness 2
    second = tel.row(3, _stats(shard), final=True)
    tel.close()
    log.close()
    assert first["staleness"]["histogram"] == {"0": 1, "1": 1} and first["steps"] == 2
    assert first["staleness_per_worker"] == {
        "0": {"count": 1, "mean": 0.0, "p50": 0, "p99": 0, "max": 0, "histogram": {"0": 1}},
        "1": {"count": 1, "mean": 1.0, "p50": 1, "p99": 1, "max": 1, "histogram": {"1": 1}}}
    assert first["pull_to_push_ms_per_worker"]["1"]["count"] == 2 and first["pull_to_push_ms"]["mean_ms"] == 3.0
    assert second["staleness_per_shard"]["0"]["histogram"] == {"2": 1} and second["final"]
    assert second["staleness_per_worker"]["0"]["count"] == 0 and second["pull_to_push_ms"] == {"count": 0}
    assert [r["kind"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["telemetry", "telemetry"]
    tags: dict[str, list] = {}
    for event in _read_events(tmp_path):
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value))
    assert {"ps/staleness", "ps/staleness/shard0", "ps/staleness_mean", "train/loss",
            "throughput/steps_per_second"} <= set(tags)
    (step, hist), = [t for t in tags["ps/staleness"] if t[0] == 2]
    assert hist.histo.num == 2 and list(hist.histo.bucket) == [1, 1] and hist.histo.max == 1
    assert [v.simple_value for _, v in tags["ps/staleness_mean"]] == [0.5, 2.0]


def test_without_tensorboardx_one_notice_and_no_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    cfg = Config()
    cfg.telemetry.tensorboard = True
    notices = []
    tel = RunTelemetry(cfg, tmp_path, log=None, notice=notices.append)
    assert tel.tb is None and len(notices) == 1 and "tensorboardX is not installed" in notices[0]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Prometheus: a real shard process, scraped over HTTP


def _free_base_port() -> int:
    """A port p with p and p + 1 free right now (chief at p, shard 0 at p + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


def _scrape(url: str, deadline_s: float = 20.0) -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_shard_process_serves_prometheus_metrics_with_staleness_histogram_by_shard(tmp_path):
    _needs("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from asyncps.partition import place
    from asyncps.ps_client import PSClient

    base = _free_base_port()
    config = tmp_path / "run.yaml"
    config.write_text(f"cluster: {{ps: 1, workers: 2}}\ntelemetry: {{prometheus_port: {base}}}\nrun_dir: {tmp_path}\n")
    port_file = tmp_path / "ps0.port"
    proc = subprocess.Popen([sys.executable, "-m", "asyncps.ps.server", str(config), "--port", "0",
                             "--port-file", str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.05)
        cfg = Config()
        cfg.cluster.ps = 1
        client = PSClient([f"127.0.0.1:{int(port_file.read_text())}"], place({"w": ((2,), "float32")}, 1), cfg)
        client.init({"w": np.zeros(2, np.float32)})
        client.register(0)
        client.register(1)
        g = {"w": np.ones(2, np.float32)}
        client.push(g, [0], 0, 0)  # staleness 0
        client.push(g, [0], 1, 0)  # staleness 1
        client.push(g, [0], 1, 1)  # staleness 2
        client.close()
        text = _scrape(f"http://127.0.0.1:{base + 1}/metrics")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"metrics on http://127.0.0.1:{base + 1}/metrics" in out
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    shard = ("shard", "0")
    assert samples[("asyncps_ps_pushes_total", (("result", "applied"), shard))] == 3
    assert samples[("asyncps_ps_pushes_total", (("result", "dropped"), shard))] == 0
    assert samples[("asyncps_ps_version", (shard,))] == 3
    assert samples[("asyncps_ps_push_staleness_count", (shard,))] == 3
    assert samples[("asyncps_ps_push_staleness_sum", (shard,))] == 3
    assert [samples[("asyncps_ps_push_staleness_bucket", (("le", le), shard))] for le in ("0.0", "1.0", "2.0", "+Inf")] == [1, 2, 3, 3]
    assert ("process_cpu_seconds_total", ()) in samples


def test_chief_metrics_endpoint(tmp_path):
    _needs("prometheus_client")
    from types import SimpleNamespace

    from asyncps.chief.telemetry import chief_families
    from asyncps.telemetry import FunctionCollector, MetricsServer

    cfg = Config()
    tel = RunTelemetry(cfg, tmp_path, log=None)
    tel.latest = {"steps_per_second": 12.5, "pull_to_push_ms_per_worker": {"0": {"count": 3, "p50_ms": 2.0, "p99_ms": 8.0}}}
    run = SimpleNamespace(step=40, failures=[], last_eval={"accuracy": 0.9},
                          membership=SimpleNamespace(alive=lambda: [1, 2], joins=2, deaths=0))
    server = MetricsServer.start([FunctionCollector(lambda: chief_families(run, tel))], _free_base_port())
    try:
        text = _scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    for line in ("asyncps_chief_global_step 40.0", "asyncps_chief_workers_alive 2.0", "asyncps_chief_worker_joins_total 2.0",
                 'asyncps_chief_eval{metric="accuracy"} 0.9', "asyncps_chief_steps_per_second 12.5",
                 'asyncps_worker_pull_to_push_seconds{quantile="0.99",worker="0"} 0.008'):
        assert line in text, text


# ----------------------------------------------------------------------------------------------
# A whole cluster


@pytest.mark.slow  # a real cluster (launcher, shard, chief, two workers), both ways
@pytest.mark.parametrize("prefetch", [False, True], ids=["async", "prefetch"])
def test_cluster_telemetry_rows_add_up_to_the_report(tmp_path, prefetch, request):
    """The suite's plain async run of two workers through `asyncps launch` (y = 2x, shared with
    tests/test_launch_ux.py: tests/conftest.py), and the same run with prefetching: both workers
    push, every push is counted once, the model is learned, every process logs. Each step sleeps
    4 ms, so the run's 1200 steps last at least 1.2 s: several telemetry rows."""
    if prefetch:
        run_dir = tmp_path
        run_ok("launch", CONFIGS / "linear_regression.yaml", f"run_dir={run_dir}", f"train.max_steps={PLAIN_LINEAR_STEPS}",
               "telemetry.every_seconds=0.3", "delay.kind=constant", "delay.mean_ms=4", "cluster.prefetch=true",
               timeout=300)
    else:
        run_dir, _ = request.getfixturevalue("plain_linear_launch")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "telemetry"]
    rep = report(run_dir)
    assert abs(rep["variables"]["linear.w"][0] - 2) < 0.02 and abs(rep["variables"]["linear.b"][0]) < 0.05
    assert rep["pushes"]["applied"] == rep["staleness"]["count"] >= rep["config"]["train"]["max_steps"]
    assert set(rep["staleness_per_worker"]) == {"0", "1"}
    for role in ("ps0", "worker0", "worker1", "chief"):
        assert (run_dir / f"{role}.log").exists()
    assert len(rows) >= 2 and rows[-1]["final"] and not any(r["final"] for r in rows[:-1])
    assert sum(r["staleness"]["count"] for r in rows) == rep["staleness"]["count"]  # exact, nothing lost
    assert sum(r["pushes"]["applied"] for r in rows) == rep["pushes"]["applied"]
    merged: dict[str, int] = {}
    for r in rows:
        for s, n in r["staleness"]["histogram"].items():
            merged[s] = merged.get(s, 0) + n
    assert merged == rep["staleness"]["histogram"]
    for w in ("0", "1"):
        assert sum(r["staleness_per_worker"].get(w, {"count": 0})["count"] for r in rows) == rep["staleness_per_worker"][w]["count"]
    assert sum(r["steps"] for r in rows) == rep["steps"]
    ptp = rep["pull_to_push_ms"]["overall"]
    assert ptp["count"] > 0 and 4.0 <= ptp["p50_ms"] and ptp["max_ms"] >= ptp["p99_ms"] >= ptp["p50_ms"]
    workers = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "worker"]
    assert any("pull_to_push/p50_ms" in r for r in workers) and not any("pull_to_push/b/1" in json.dumps(r) for r in workers)
