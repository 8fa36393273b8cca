"""Shared test fixtures: a seeded RNG for every test, one BLAS thread per process."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the thread pins, which numpy reads at import)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_numpy():
    np.random.seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# One plain asynchronous run of y = 2x through `asyncps launch` (one shard, two workers), shared by
# tests/test_launch_ux.py (the summary, exact counts, evaluations, clocks) and tests/test_telemetry.py
# (its telemetry rows add up to its report), which each launched an equivalent run of their own: a
# launch is seconds of process start-up. Each step sleeps 4 ms, so the run lasts at least 1.2 s:
# several telemetry windows (0.3 s) and evaluations (every 100 steps) while it trains.
PLAIN_LINEAR_STEPS = 1200


@pytest.fixture(scope="session")
def plain_linear_launch(tmp_path_factory):
    """(run_dir, the launcher's completed process)."""
    from cli_runner import CONFIGS, run_ok

    run_dir = tmp_path_factory.mktemp("plain_linear")
    proc = run_ok("launch", CONFIGS / "linear_regression.yaml", f"run_dir={run_dir}",
                  f"train.max_steps={PLAIN_LINEAR_STEPS}", "train.eval_every=100", "telemetry.every_seconds=0.3",
                  "delay.kind=constant", "delay.mean_ms=4", timeout=300)
    return run_dir, proc
