"""Runs the real `asyncps` command in a child process, as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def asyncps(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`asyncps ARGS...`; the completed process, output captured as text. `env`: added to ours."""
    return subprocess.run([sys.executable, "-m", "asyncps.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=None if env is None else {**os.environ, **env})


def run_ok(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = asyncps(*args, timeout=timeout, env=env)
    assert proc.returncode == 0, f"asyncps {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def report(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl written so far ([] before it exists; a line still being
    written is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wait_until(proc: subprocess.Popen, what: str, predicate, timeout: float = 60.0, tail=lambda: ""):
    """Polls `predicate` until it returns something true (returned) while `proc` runs: an event
    wait, the 50 ms poll only bounds how late it is seen. Fails naming `what` (and `tail()`, e.g.
    the end of a log) when `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}:\n{tail()}"
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s:\n{tail()}")
