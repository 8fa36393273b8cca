"""Synthetic click-through data: hashed categorical features with a known logistic truth.

Each example has `fields` categorical features; field f takes one of `vocab` values drawn from a
Zipf-like law (p(k) ~ 1/(k+1)^1.1: a few hot values, a long tail of rare ones, as in ad logs).
A value becomes a 64-bit id by hashing (field name, value) (asyncps.hashing.feature_ids), so the
model never sees a vocabulary. The label is a click drawn from a logistic model over per-value
weights (N(0, weight_std)) plus a bias: the best achievable loss is known to the generator, and a
model that learns the weights of the hot values gets most of the way there. Deterministic from
the seed; the test set is drawn from the same law.
"""
from __future__ import annotations

import numpy as np

from asyncps.hashing import feature_ids


def make_ctr(num_train: int, num_test: int, fields: int, vocab: int, seed: int, weight_std: float = 0.7,
             bias: float = -1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train int64 ids (n, fields), y_train int64 clicks, x_test, y_test)."""
    rng = np.random.default_rng([seed, 0xC7])
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    weights = rng.normal(0.0, weight_std, size=(fields, vocab))
    n = num_train + num_test
    values = np.stack([rng.choice(vocab, size=n, p=p) for _ in range(fields)], axis=1)
    logit = bias + weights[np.arange(fields)[None, :], values].sum(axis=1)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    x = np.stack([feature_ids(f"field{f}", values[:, f]) for f in range(fields)], axis=1)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]
