"""Synthetic linear regression data: the articles' y = 2x, with optional Gaussian noise."""
from __future__ import annotations

import numpy as np

from asyncps.errors import ConfigError

SLOPE = 2.0
NUM_TEST = 1000  # held-out examples, drawn from the same distribution as the training set


def make_linear(num_train: int, num_test: int = NUM_TEST, noise: float = 0.0, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``, each float32 of shape (n, 1).

    x is uniform in [-1, 1] and y = 2x + noise * N(0, 1). The train and test sets come from
    independent streams of one seed, so changing `num_test` leaves the training set unchanged.
    """
    if num_train < 1 or num_test < 1:
        raise ConfigError(f"data.num_train must be at least 1, got {num_train}" if num_train < 1
                          else f"linear test set size must be at least 1, got {num_test}")
    if noise < 0:
        raise ConfigError(f"data.noise must be 0 or more, got {noise}")
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
    return (*_draw(num_train, noise, train_seq), *_draw(num_test, noise, test_seq))


def _draw(n: int, noise: float, seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 1))
    y = SLOPE * x + noise * rng.standard_normal((n, 1))
    return x.astype(np.float32), y.astype(np.float32)
