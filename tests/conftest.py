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
