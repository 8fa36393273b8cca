"""Chaos: real `asyncps launch` runs whose processes are killed at seeded random moments.

The chaos drill (`slow`) trains MNIST softmax with 2 shards and 3 workers, checkpoints often, and
kills workers and shards several times with SIGKILL and SIGTERM. It checks what a user relies
on (docs/failures.md): the run reaches its target, no push is applied twice on any shard, and
every update a shard lost is accounted for in report.json.

`CHAOS_SEED=N` replays one schedule; the seed, the kills and the figures are printed.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from cli_runner import CONFIGS, report
from test_faults import Launch

LINEAR = CONFIGS / "linear_regression.yaml"
MNIST = CONFIGS / "mnist_softmax.yaml"


@pytest.fixture
def launch():
    runs = []
    yield lambda run_dir, *args: runs.append(Launch(run_dir, *args)) or runs[-1]
    for run in runs:
        run.close()


def launcher_output(run: Launch) -> str:
    path = run.run_dir / "launch.out"
    return path.read_text() if path.exists() else ""


def test_worker_pushing_nan_exits_at_once_naming_the_variable(tmp_path, launch):
    """A diverged model (learning rate 1e30: weights overflow, gradients become NaN) is refused
    by the shard with INVALID_ARGUMENT: the worker must not take it for a restored shard and
    rejoin 20 times, but exit 1 with one line naming the variable and the problem."""
    run = launch(tmp_path, LINEAR, "optimizer.learning_rate=1.0e+30", "cluster.workers=1",
                 "cluster.restart_policy.worker=never", "train.max_seconds=300", "cluster.heartbeat_interval=0.5")
    run.wait_until("the worker's exit", lambda: "worker0 exited with code 1" in launcher_output(run), timeout=120)
    log = (tmp_path / "worker0.log").read_text()
    assert "registering again" not in log, log
    (line,) = [x for x in log.splitlines() if "INVALID_ARGUMENT" in x]
    assert line.startswith("worker 0: INVALID_ARGUMENT: variable 'linear.") and "non-finite" in line, line
