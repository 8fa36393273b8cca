"""Runs the real `asyncps` command in a child process, as a user would."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def asyncps(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`asyncps ARGS...`; the completed process, output captured as text."""
    return subprocess.run([sys.executable, "-m", "asyncps.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def run_ok(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = asyncps(*args, timeout=timeout)
    assert proc.returncode == 0, f"asyncps {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def report(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())
