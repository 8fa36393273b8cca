"""Shared test fixtures: a seeded RNG for every test, one BLAS thread per process, and what
several test files use and is costly to make (one plain cluster run, a small MNIST-shaped folder)."""
import os
import struct

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


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory):
    """A folder of MNIST-shaped IDX files (`data.path`): 1200 training and 200 test images of
    random pixels, for runs that check arithmetic (a replay, staleness draws, bit-for-bit
    identities), not accuracy: loading and evaluating on MNIST's 70,000 images is seconds a
    process (the chief's and the replay's evaluations of a CNN took most of a minute)."""
    folder = tmp_path_factory.mktemp("small_mnist")
    rng = np.random.default_rng(0)
    for split, stem, n in (("train", "train", 1200), ("test", "t10k", 200)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{stem}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return folder
