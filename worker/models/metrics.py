"""Held-out metrics of a click model: log loss and AUC (the CTR literature's two yardsticks).

Both take click probabilities or scores as plain arrays, so the planted model of the synthetic
click logs (worker/data/click_logs.py) is scored by the very code that scores a trained model.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-12  # probabilities are clipped to [EPS, 1 - EPS]: a confident miss costs ~27.6 nats, not inf


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the 0/1 `labels` under click probabilities `p`."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    y = np.asarray(labels).astype(bool)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def log_loss_of_logits(z: np.ndarray, labels: np.ndarray) -> float:
    """`log_loss` of sigmoid(z), computed without forming the probability (stable for large |z|):
    -log sigmoid(z) = log(1 + e^-z) = logaddexp(0, -z)."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    return float(np.mean(np.logaddexp(0.0, np.where(y, -z, z))))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random click > score of a random non-click), ties
    counted half (the Mann-Whitney U statistic over ranks); 0.5 when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average 1-based rank of each run of tied scores
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
