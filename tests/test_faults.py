"""Fault tests: real `asyncps launch` clusters whose processes are SIGKILLed mid-run.

Each test starts the launcher as a child process, waits (polling with a deadline, never a bare
sleep) for the run to reach a point, kills one process found in the run's pids.json, and checks
what the run recorded. Every process is reaped: the launcher reaps its children, the test reaps
the launcher and checks that no process of the run is left.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import CONFIGS, REPO, report, run_ok

LINEAR = CONFIGS / "linear_regression.yaml"
FAST = ["cluster.heartbeat_interval=0.5", "cluster.heartbeat_timeout=5", "train.log_every=20", "train.eval_every=200"]


class Launch:
    """`asyncps launch ARGS` in the background, with helpers to watch and hurt it."""

    def __init__(self, run_dir: Path, *args: str):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out = (self.run_dir / "launch.out").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncps.cli", "launch", *map(str, args), f"run_dir={run_dir}"],
                                     stdout=self.out, stderr=subprocess.STDOUT, cwd=REPO)
        self.seen_pids: set[int] = set()

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written
                pass
        return rows

    def step(self) -> int:
        return max((r["step"] for r in self.rows() if r["kind"] in ("progress", "checkpoint", "eval")), default=0)

    def wait_until(self, what: str, predicate, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"the launcher exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
            time.sleep(0.05)
        pytest.fail(f"no {what} within {timeout} s:\n{self.tail()}")

    def training(self, step: int) -> bool:
        """Past `step`, with every worker registered (so a kill hits a member of the run)."""
        return self.step() >= step and sum(r["kind"] == "worker_joined" for r in self.rows()) >= 2

    def checkpoint_at_least(self, step: int) -> dict | None:
        return next((r for r in self.rows() if r["kind"] == "checkpoint" and r["step"] >= step), None)

    def pids(self) -> dict[str, int]:
        pids = {name: v["pid"] for name, v in json.loads((self.run_dir / "pids.json").read_text()).items()}
        self.seen_pids |= set(pids.values())
        return pids

    def kill(self, name: str) -> int:
        pid = self.pids()[name]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not finish within {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return "".join((self.run_dir / f).read_text()[-1500:] for f in ("launch.out", "chief.log") if (self.run_dir / f).exists())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        if (self.run_dir / "pids.json").exists():
            self.pids()
        assert_all_gone(self.seen_pids)


def assert_all_gone(pids: set[int], timeout: float = 15.0) -> None:
    """Every process of the run has exited (children of a dead launcher get SIGTERM)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if _alive(p)}
        time.sleep(0.05)
    assert not left, f"processes left behind: {sorted(left)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def launch():
    runs = []
    yield lambda run_dir, *args: runs.append(Launch(run_dir, *args)) or runs[-1]
    for run in runs:
        run.close()


def test_worker_killed_mid_step_training_continues(tmp_path, launch):
    # 5 ms a step leaves the chief seconds to see the death and the restarted worker time to
    # join before the run ends (900 bare steps once finished before either, on a busy machine).
    run = launch(tmp_path, LINEAR, "train.max_steps=2000", "delay.kind=constant", "delay.mean_ms=5", *FAST)
    run.wait_until("step 150", lambda: run.training(150))
    killed = run.kill("worker1")
    assert run.wait() == 0, run.tail()
    r = report(tmp_path)
    assert r["steps"] >= 2000 and abs(r["variables"]["linear.w"][0] - 2) < 0.02
    worker_failures = [f for f in r["failures"] if f["role"] == "worker"]
    assert len(worker_failures) == 1 and worker_failures[0]["steps_lost"] == 0
    assert r["membership"]["joins"] == 3  # two workers, then the restarted one took the free index
    assert r["pushes"]["rejected"] == 0 and r["pushes"]["applied"] == r["versions"][0]
    assert json.loads((tmp_path / "pids.json").read_text())["worker1"]["restarts"] == 1
    assert killed != run.pids()["worker1"]


def test_worker_declared_dead_while_alive_is_replaced_and_the_run_finishes(tmp_path, launch):
    """A worker frozen (SIGSTOP) past the heartbeat timeout is declared dead; when it wakes, the
    chief answers NOT_FOUND and the worker exits 1 so the restart policy replaces it (it used to
    exit 0, which nobody restarts: with every worker gone that way the run waited forever)."""
    run = launch(tmp_path, LINEAR, "train.max_steps=3000", "delay.kind=constant", "delay.mean_ms=5",
                 "cluster.heartbeat_interval=0.3",
                 "cluster.heartbeat_timeout=2", "train.log_every=20", "train.eval_every=200")
    run.wait_until("step 100", lambda: run.training(100))
    frozen = run.pids()["worker0"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        run.wait_until("worker 0 declared dead", lambda: any(r["kind"] == "worker_dead" for r in run.rows()))
    finally:
        os.kill(frozen, signal.SIGCONT)
    run.wait_until("worker0's restart", lambda: run.pids()["worker0"] != frozen, timeout=60)
    assert run.wait() == 0, run.tail()
    r = report(tmp_path)
    assert r["steps"] >= 3000 and abs(r["variables"]["linear.w"][0] - 2) < 0.02
    assert r["membership"]["deaths"] >= 1 and r["pushes"]["reapplied"] == 0
    assert "declared dead by the chief" in (tmp_path / "worker0.log").read_text()


def test_shard_killed_restores_from_checkpoint(tmp_path, launch):
    run = launch(tmp_path, LINEAR, "cluster.ps=2", "checkpoint.every_steps=100", "train.max_steps=1000", *FAST)
    run.wait_until("a checkpoint at step >= 200", lambda: run.checkpoint_at_least(200))
    run.kill("ps1")
    run.wait_until("the restore", lambda: any(r["kind"] == "failure" and r["role"] == "ps" for r in run.rows()))
    assert run.wait() == 0, run.tail()
    r = report(tmp_path)
    (failure,) = [f for f in r["failures"] if f["role"] == "ps"]
    assert failure["index"] == 1 and 200 <= failure["restored_step"] <= failure["at_step"]
    assert failure["steps_lost"] == failure["at_step"] - failure["restored_step"]
    assert r["steps"] >= 1000 and abs(r["variables"]["linear.w"][0] - 2) < 0.02
    assert r["checkpoints"]["count"] >= 3 and r["checkpoints"]["pause_ms_max"] > 0


def test_chief_killed_resume_continues(tmp_path, launch):
    run = launch(tmp_path, LINEAR, "checkpoint.every_steps=100", "train.max_steps=1200", *FAST)
    saved = run.wait_until("a checkpoint at step >= 200", lambda: run.checkpoint_at_least(200))
    run.kill("chief")
    assert run.wait() != 0  # restart_policy.chief is `never`: the launcher stops the run
    assert not (tmp_path / "report.json").exists()
    run_ok("launch", LINEAR, "--resume", f"run_dir={tmp_path}", "checkpoint.every_steps=100", "train.max_steps=1200",
           *FAST, timeout=120)
    r = report(tmp_path)
    assert r["resumed_from"] >= saved["step"] and r["steps"] >= 1200
    (failure,) = [f for f in r["failures"] if f["role"] == "chief"]
    assert failure["restored_step"] == r["resumed_from"] and failure["at_step"] >= failure["restored_step"]
    assert abs(r["variables"]["linear.w"][0] - 2) < 0.02
    starts = [row for row in run.rows() if row["kind"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] == r["resumed_from"]


def test_chief_killed_and_restarted_by_the_launcher_adopts_the_live_shards(tmp_path, launch):
    run = launch(tmp_path, LINEAR, "cluster.restart_policy.chief=on_failure", "train.max_steps=2500", *FAST)
    run.wait_until("step 200", lambda: run.training(200))
    run.kill("chief")
    assert run.wait() == 0, run.tail()
    r = report(tmp_path)
    (failure,) = r["failures"]
    assert failure["role"] == "chief" and failure["steps_lost"] == 0  # the shards kept their state
    assert r["steps"] >= 2500 and abs(r["variables"]["linear.w"][0] - 2) < 0.02
    adopted = {row["worker"] for row in run.rows() if row["kind"] == "worker_adopted"}
    assert adopted == {0, 1}  # the live workers' heartbeats were adopted by the new chief
    assert all("the chief asked to stop" in (tmp_path / f"worker{i}.log").read_text() for i in (0, 1))


@pytest.mark.slow
def test_mnist_mlp_survives_worker_shard_and_chief_kills_and_reaches_97_percent(tmp_path, launch):
    """The issue's drill: kill a worker, then a shard, then the chief at random moments; resume."""
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    args = [CONFIGS / "mnist_mlp.yaml", "checkpoint.every_steps=250", "train.log_every=50", "cluster.heartbeat_timeout=5"]
    run = launch(tmp_path / "run", *args)
    at = rng.randint(200, 700)
    run.wait_until("the worker kill", lambda: run.step() >= at, timeout=240)
    run.kill(f"worker{rng.randint(0, 1)}")
    at = rng.randint(900, 1400)
    run.wait_until("the shard kill", lambda: run.step() >= at and run.checkpoint_at_least(500), timeout=240)
    run.kill(f"ps{rng.randint(0, 1)}")
    run.wait_until("the shard restore", lambda: any(r["kind"] == "failure" and r["role"] == "ps" for r in run.rows()),
                   timeout=120)
    at = rng.randint(1700, 2300)
    run.wait_until("the chief kill", lambda: run.step() >= at, timeout=240)
    run.kill("chief")
    assert run.wait(120) != 0
    run_ok("launch", *args, "--resume", f"run_dir={tmp_path / 'run'}", timeout=400)
    r = report(tmp_path / "run")
    print(f"FAULT_SEED={seed} final={r['final']} failures={r['failures']} checkpoints={r['checkpoints']}")
    # Reached 97% at an evaluation (async SGD at lr 0.1 swings a point between evaluations, so
    # the last one alone once read 95.9% after 97% had been reached), and no collapse at the end.
    assert r["target"]["reached"] or r["final"]["accuracy"] >= 0.97, (r["target"], r["final"])
    assert r["final"]["accuracy"] >= 0.95
    assert [f["role"] for f in r["failures"]] == ["worker", "ps", "chief"]
    assert all(f["steps_lost"] >= 0 for f in r["failures"])
