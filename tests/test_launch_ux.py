"""What a user sees of `asyncps launch`: the summary, exact counts and clocks, one-line mistakes.

One real cluster run on y = 2x (seconds) carries most assertions; the operator mistakes are
refused before anything starts; the launcher's handling of a child's configuration error is
tested with real child processes that stand in for roles.
"""
from __future__ import annotations

import io
import json
import socket
import sys
from pathlib import Path

import pytest

from asyncps.cli.launch import failed_shard, supervise
from asyncps.cli.processes import Child
from asyncps.cli.watch import RunWatcher
from asyncps.config import load_config
from cli_runner import CONFIGS, asyncps, report, run_ok
from conftest import PLAIN_LINEAR_STEPS

LINEAR = CONFIGS / "linear_regression.yaml"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def linear_run(plain_linear_launch):
    """The suite's plain async run of y = 2x (tests/conftest.py), PLAIN_LINEAR_STEPS steps. Its
    five tests stay in the quick subset (`-m "not slow"`): one real launch of every role over the
    default transport, about 7 s, so the quick subset still starts a cluster end to end."""
    return plain_linear_launch


def test_launch_ends_with_the_summary_train_prints(linear_run):
    run_dir, proc = linear_run
    out = proc.stdout.splitlines()
    assert out[0] == f"run_dir: {run_dir}"
    assert out[1].startswith("final: loss=") and out[1].endswith(f"at step {PLAIN_LINEAR_STEPS}")
    assert out[2].startswith("target mse 0.0001: reached at step ")
    r = report(run_dir)  # the throughput line says what report.json recorded, transport included
    pushes = r["transport"]["pushes"]
    assert r["transport"] == {"configured": "auto", "used": "shm", "workers": 2, "shm_segments_per_shard": {"0": 2},
                              "shm_bytes_per_shard": {"0": r["transport"]["shm_bytes_per_shard"]["0"]},
                              "pushes": pushes}
    assert pushes["grpc"] == 0 and pushes["shm"] >= r["steps"]  # every applied push came through the segment
    mib = r["transport"]["shm_bytes_per_shard"]["0"] / 2**20
    assert out[3] == (f"throughput: {r['throughput']['steps_per_second']:.1f} steps/s ({r['steps']} steps in "
                      f"{r['seconds']:.1f} s); transport: shared memory, 2 of 2 workers on the shard ({mib:.1f} MiB "
                      "of segments)")
    assert out[4] == f"logs: {run_dir}/*.log"


def test_the_throughput_line_says_which_data_plane_the_workers_used():
    """chief/report.py's `transport` section from the shards' segment counts, and its words in
    the summary: every worker on every shard, none (gRPC), or some (mixed, e.g. a compose run
    where only some containers share /dev/shm)."""
    from types import SimpleNamespace

    from asyncps.chief.report import transport_section
    from asyncps.cli.summary import throughput_line

    cfg = load_config(LINEAR, ["cluster.ps=2", "cluster.workers=3"])

    def section(*segments, grpc_pushes=0):
        stats = [SimpleNamespace(shard=i, shm_segments=n, shm_bytes=n << 20, shm_pushes=100 if n else 0,
                                 grpc_pushes=grpc_pushes) for i, n in enumerate(segments)]
        return transport_section(stats, cfg)

    base = {"throughput": {"steps_per_second": 612.34}, "steps": 3000, "seconds": 4.9}
    assert section(3, 3)["used"] == "shm" and section(0, 0)["used"] == "grpc" and section(3, 1)["used"] == "mixed"
    assert throughput_line({**base, "transport": section(3, 3)}) == (
        "throughput: 612.3 steps/s (3000 steps in 4.9 s); transport: shared memory, 3 of 3 workers on each of 2 "
        "shards (6.0 MiB of segments)")
    assert throughput_line({**base, "transport": section(0, 0)}).endswith("; transport: gRPC (cluster.transport auto)")
    assert throughput_line({**base, "transport": section(3, 1)}).endswith(
        "; transport: mixed: shared memory for 1-3 of 3 workers per shard (4.0 MiB), gRPC for the rest")
    # segments held, yet some pushes took gRPC (one that did not fit its segment): said, counted
    assert section(3, 3, grpc_pushes=5)["pushes"] == {"shm": 200, "grpc": 10}
    assert throughput_line({**base, "transport": section(3, 3, grpc_pushes=5)}).endswith(
        "(6.0 MiB of segments); 10 of 210 pushes over gRPC")
    assert throughput_line(base) == "throughput: 612.3 steps/s (3000 steps in 4.9 s)"  # asyncps train: no transport
    assert throughput_line({"steps": 3}) is None  # a report without throughput: no line


def test_the_summary_puts_the_planted_model_beside_the_run_for_train_and_launch():
    """One formatter (cli/summary.py) for both commands: a report with `reference` (click_logs)
    gets the planted line after the target, before the tables and the logs; a report without one
    gets none. The chief's report takes `reference` from the test set it evaluates on."""
    from asyncps.chief.report import reference_section
    from asyncps.cli.summary import summary_lines
    from asyncps.worker.data import load_dataset

    report = {"run_dir": "/r", "final": {"loss": 0.4306, "auc": 0.75}, "steps": 9, "requested_steps": 9,
              "target": {"metric": "loss", "value": 0.44, "reached": True, "step": 8, "seconds": 1.5},
              "reference": {"loss": 0.4206, "auc": 0.7712},
              "tables": {"w": {"rows": 5, "rows_per_shard": {"0": 2, "1": 3}, "hot_vs_cold": {}}}}
    lines = summary_lines(report, logs="/r/*.log")
    assert lines[3] == "planted model: loss=0.4206 auc=0.7712 (best achievable); this run: loss +0.0100, auc -0.0212"
    assert lines[4].startswith("table w: 5 rows on 2 shards") and lines[5] == "logs: /r/*.log"
    del report["reference"]
    assert not any(line.startswith("planted model") for line in summary_lines(report))

    cfg = load_config(CONFIGS / "ctr_lr.yaml", ["data.num_train=200", "data.num_test=200", "data.vocab=50"])

    class Chief:  # what cluster_report reads of a ChiefRun here: the data it evaluates on
        data = load_dataset(cfg.data, seed=cfg.seed)

    assert set(Chief.data.reference) == {"loss", "auc"}
    assert reference_section(Chief()) == {"reference": Chief.data.reference}
    Chief.data = load_dataset(load_config(LINEAR).data, seed=0)
    assert reference_section(Chief()) == {}


def test_max_steps_is_exactly_the_updates_applied(linear_run):
    run_dir, _ = linear_run
    r = report(run_dir)
    assert r["steps"] == r["requested_steps"] == PLAIN_LINEAR_STEPS
    assert r["versions"] == [PLAIN_LINEAR_STEPS] and r["pushes"]["applied"] == PLAIN_LINEAR_STEPS


def test_evaluations_are_at_exact_multiples_of_eval_every(linear_run):
    run_dir, _ = linear_run
    steps = [r["step"] for r in rows(run_dir) if r["kind"] == "eval"]
    assert steps[:-1] == list(range(100, PLAIN_LINEAR_STEPS, 100))  # the last one is the final evaluation
    assert steps[-1] == PLAIN_LINEAR_STEPS
    final = [r for r in rows(run_dir) if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["evaluation"] == "at stop"


def test_one_zero_point_and_no_death_for_stopped_workers(linear_run):
    run_dir, _ = linear_run
    all_rows, r = rows(run_dir), report(run_dir)
    start = next(x for x in all_rows if x["kind"] == "start")
    assert abs(start["time"]) < 0.5 and start["workers_ready"] == 2 and start["startup_seconds"] > 0
    joined = [x for x in all_rows if x["kind"] == "worker_joined"]
    assert len(joined) == 2 and all(x["time"] <= start["time"] for x in joined)  # before step 0
    target_eval = next(x for x in all_rows if x["kind"] == "eval" and x["step"] == r["target"]["step"])
    assert abs(target_eval["time"] - r["target"]["seconds"]) < 0.1  # the same clock
    assert not [x for x in all_rows if x["kind"] == "worker_dead"]
    assert all_rows[-1]["kind"] in ("final", "worker_exited") and r["membership"]["deaths"] == 0


def test_the_last_telemetry_window_is_flushed_at_stop(linear_run):
    run_dir, _ = linear_run
    final_rows = [x for x in rows(run_dir) if x["kind"] == "telemetry" and x["final"]]
    assert len(final_rows) == 1
    assert set(report(run_dir)["pull_to_push_ms"]["per_worker"]) == {"0", "1"}


@pytest.mark.slow
def test_a_missed_target_is_said_in_words_and_exits_0(tmp_path):
    proc = run_ok("launch", LINEAR, f"run_dir={tmp_path}", "train.max_steps=60", "train.target.value=1.0e-30",
                  "cluster.workers=1", timeout=180, env={"ASYNCPS_SPAWN": "exec"})
    assert "target mse 1e-30: NOT reached" in proc.stdout
    # ASYNCPS_SPAWN=exec: every role a fresh interpreter, as before roles were forked (cli/processes.py)
    assert {entry["started"] for entry in json.loads((tmp_path / "pids.json").read_text()).values()} == {"exec"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="roles are forked on Linux only")
def test_the_launch_command_forks_its_roles_from_itself(linear_run):
    run_dir, _ = linear_run
    pids = json.loads((run_dir / "pids.json").read_text())
    assert {entry["started"] for entry in pids.values()} == {"fork"}, pids
    assert "Traceback" not in "".join(p.read_text() for p in run_dir.glob("*.log"))


@pytest.mark.parametrize("key", ["cluster.chief_port", "cluster.ps_ports", "telemetry.prometheus_port"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, key):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        value = f"[{port}]" if key == "cluster.ps_ports" else str(port)
        proc = asyncps("launch", LINEAR, f"{key}={value}", "cluster.ps=1", f"run_dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"asyncps launch: error: {key}{'[0]' if key == 'cluster.ps_ports' else ''}: port {port} on 127.0.0.1 "
        f"is already in use (free it or choose another port)"]
    assert not (tmp_path / "r").exists()  # nothing was started


def test_a_child_with_a_configuration_error_is_not_restarted(tmp_path):
    """A role that exits 2 (here: a stand-in shard) is never restarted; its line is repeated."""
    cfg = load_config(LINEAR, [f"run_dir={tmp_path}", "cluster.restart_policy.ps=on_failure",
                               "cluster.restart_policy.max_restarts=3"])
    bad = "asyncps ps: error: ps 0: cannot listen on 127.0.0.1:1234 (port in use?)"
    children = [Child("ps0", [sys.executable, "-c", f"import sys; print({bad!r}); sys.exit(2)"], tmp_path / "ps0.log",
                      role="ps"),
                Child("chief", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "chief.log", role="chief")]
    out = io.StringIO()
    assert supervise(children, cfg, stream=out) == 2
    assert children[0].restarts == 0
    assert f"asyncps launch: error: ps0: {bad} (see {tmp_path / 'ps0.log'})" in out.getvalue()
    assert children[1].poll() is not None  # the others were stopped


def test_a_shard_killed_between_the_restart_pass_and_the_shard_check_is_restarted_not_fatal(tmp_path):
    """The launcher's loop restarts dead children, then asks whether a shard failed for good. A
    shard SIGKILLed between the two (it happened under load: the run stopped with "ps1 exited
    with code -9; stopping the run") must be left for the next restart pass, not end the run."""
    cfg = load_config(LINEAR, [f"run_dir={tmp_path}", "cluster.restart_policy.ps=on_failure",
                               "cluster.restart_policy.max_restarts=2"])
    shard = Child("ps1", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                  tmp_path / "ps1.log", role="ps")
    shard.start()
    shard.popen.wait()  # dead by SIGKILL, as if just after the restart pass looked
    assert shard.poll() == -9
    assert failed_shard([shard], cfg.cluster.restart_policy) is None  # the next pass restarts it
    shard.restarts = 2  # the policy's restarts spent: now the run cannot go on
    assert failed_shard([shard], cfg.cluster.restart_policy) is shard


def test_the_watcher_reports_progress_and_failures(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("")
    out = io.StringIO()
    clock = iter(range(0, 1000, 10)).__next__
    watcher = RunWatcher(tmp_path, max_steps=1000, workers=2, stream=out, every_seconds=5, clock=clock)
    lines = [{"kind": "worker_joined", "step": 0, "time": -1, "worker": 0}, {"kind": "start", "step": 0, "time": 0},
             {"kind": "progress", "step": 100, "time": 1.0},
             {"kind": "eval", "step": 200, "time": 2.0, "accuracy": 0.9},
             {"kind": "telemetry", "step": 200, "time": 2.0, "staleness": {"count": 3, "mean": 1.5}},
             {"kind": "failure", "step": 200, "time": 2.1, "role": "ps", "index": 1, "at_step": 200,
              "restored_step": 150, "steps_lost": 50}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "progr')  # a row being written
    watcher.poll(restarts=1)
    text = out.getvalue()
    assert "asyncps launch: ps 1 failed at step 200; model restored to step 150 (50 steps lost)" in text
    assert "step 200/1000  100 steps/s  eval accuracy=0.9000 @200  staleness 1.50  workers 1/2  restarts 1" in text


def test_options_may_come_anywhere_and_version_is_known():
    proc = run_ok("launch", LINEAR, "train.max_steps=5", "--dry-run", "cluster.workers=1")
    assert "max_steps: 5" in proc.stdout and proc.stdout.count("TF_CONFIG=") == 1 + 1 + 1
    assert run_ok("--version").stdout.startswith("asyncps ")


def test_resume_of_something_that_is_no_run_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    for target, why in ((tmp_path, "not a run directory"), (tmp_path / "missing", "no such file or directory")):
        proc = asyncps("launch", LINEAR, "--resume", target, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert why in proc.stderr


@pytest.mark.parametrize("override", ["staleness.simulate.workers=8", "staleness.workers=4"])
def test_train_only_staleness_keys_are_refused_by_launch(override, tmp_path):
    extra = ["staleness.controlled=true"] if override.startswith("staleness.workers") else []
    proc = asyncps("launch", LINEAR, override, *extra, f"run_dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode == 2 and "asyncps train" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it():
    """gRPC's default SO_REUSEPORT let two shards serve one port and split its connections."""
    from asyncps.errors import UserError
    from asyncps.ps.server import ShardServer

    cfg = load_config(LINEAR, ["cluster.ps=1"])
    first = ShardServer(cfg, 0)
    port = first.start()
    try:
        with pytest.raises(UserError, match="cannot listen"):
            ShardServer(cfg, 0, port=port).start()
    finally:
        first.stop(grace=0)


@pytest.mark.parametrize("ports", [["cluster.ps=2", "cluster.ps_ports=[5000,5000]"],
                                   ["cluster.ps=1", "cluster.ps_ports=[5000]", "cluster.chief_port=5000"]])
def test_duplicate_ports_are_one_line(ports):
    from asyncps.errors import ConfigError

    with pytest.raises(ConfigError, match="must all differ"):
        load_config(LINEAR, ports)


@pytest.mark.slow
def test_a_stop_file_ends_the_run_cleanly_with_its_report(tmp_path):
    import subprocess
    import sys
    import time

    from cli_runner import REPO

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "asyncps.cli", "launch", str(LINEAR), f"run_dir={run_dir}",
                             "train.max_steps=100000000", "delay.kind=constant", "delay.mean_ms=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or '"kind": "eval"' not in (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no evaluation before the deadline"
            time.sleep(0.05)
        (run_dir / "STOP").touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    r = report(run_dir)
    assert 0 < r["steps"] < 100000000 and r["final"]
    assert any(x["kind"] == "stop_requested" for x in rows(run_dir))


def test_roles_are_forked_only_by_the_launch_command_with_one_thread_and_blas_pinned(monkeypatch):
    import threading

    from asyncps.cli import processes

    monkeypatch.setattr(processes, "_fork_allowed", False)
    for var in processes.BLAS_THREAD_VARS:
        monkeypatch.setenv(var, "1")
    monkeypatch.delenv(processes.SPAWN_ENV, raising=False)
    monkeypatch.setattr(processes, "_threads", lambda: 1)
    assert not processes.can_fork()  # this process never said it is the launch command
    processes.allow_fork()
    assert processes.can_fork() == sys.platform.startswith("linux")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # BLAS may already run 4 threads here: exec instead
    assert not processes.can_fork()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(processes.SPAWN_ENV, "exec")
    assert not processes.can_fork()
    monkeypatch.delenv(processes.SPAWN_ENV)
    monkeypatch.undo()  # the real thread count from here on
    monkeypatch.setattr(processes, "_fork_allowed", True)
    for var in processes.BLAS_THREAD_VARS:
        monkeypatch.setenv(var, "1")
    held = threading.Event()
    thread = threading.Thread(target=held.wait)
    thread.start()
    try:
        assert not processes.can_fork()  # a second thread (it might hold a lock the child needs)
    finally:
        held.set()
        thread.join()


def test_progress_lines_go_to_the_stderr_of_the_moment_not_of_import_time(tmp_path, monkeypatch):
    """A default of `stream=sys.stderr` was bound when the module was imported: a later run in a
    process whose stderr had been replaced since (pytest's capture, a library user's redirect)
    wrote to, or failed on, the old one (ValueError: I/O operation on closed file)."""
    from asyncps.runs import Progress

    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    assert Progress(10).stream is now
    assert RunWatcher(tmp_path, max_steps=10, workers=1).stream is now
