"""Criteo-like click logs with a planted ground truth, so the best achievable loss is known.

An example has `fields` categorical features (26 as in Criteo) and `numeric` counts (13):

- categorical field f takes the value of rank r in [1, V_f] with probability ~ r^-zipf (a few
  hot values, a long tail). The vocabularies spread geometrically from `vocab` (field 0, up to
  10^8) down to 4 (the last field), as Criteo's do (C1 has ~1.5k values, C3 ~10M, C20 4). Ranks
  are drawn by inverting the bounded power law's CDF, so no vocabulary-sized array exists:
  memory grows with the examples only. The value becomes an id by `click_features.field_ids`.
- numeric field j is a log-normal count floor(exp(mu_j + s_j N(0,1))), missing with
  probability q_j (0 to 45%, as Criteo's integer columns are); the model sees its log-bucket id.

The label is a click drawn from the planted logistic model

    logit = bias + sum_f w(f, value) + sum_j (a_j (log(1 + x_j) - c_j) or m_j when missing)
            + sum over `interactions` field pairs of u(pair of values)

where w(f, value) = cat_std * z(id) * rank^-decay and u = interaction_std * z(pair), z a
standard normal made by hashing (seed, id) (Box-Muller on SplitMix64 bits): a weight is a pure
function of its id, never stored. Weights shrink with the rank (the hot values carry the signal,
the tail mostly noise), which is what makes the planted log loss reachable by a learner that
never sees most tail values twice. The interactions join the smallest-vocabulary fields pairwise
(the last two, the two before, ...): a logistic regression cannot represent them, an MLP over
the fields' embeddings can.

The planted probabilities of the test set give the best achievable held-out log loss and AUC
(`planted_metrics`). Deterministic from the seed; examples are made in blocks of BLOCK, each from
its own seeded stream, so the training set does not depend on `num_test` nor the test set on
`num_train`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from asyncps.hashing import splitmix64
from asyncps.worker.data.click_features import field_ids, numeric_buckets, numeric_ids

BLOCK = 1 << 16  # examples per seeded block (bounds the temporaries too)
_TRAIN, _TEST, _NUMERIC, _WEIGHT, _PAIR = 11, 12, 13, 14, 15  # first seed words of each random stream


@dataclass(frozen=True)
class ClickLogSpec:
    """The law of the logs (every number here is a config key of `data`, same name)."""

    fields: int = 26
    numeric: int = 13
    vocab: int = 10**8
    zipf: float = 1.1
    cat_std: float = 0.6  # std of a rank-1 value's weight
    decay: float = 0.3  # weight std falls as rank^-decay
    numeric_std: float = 0.3  # std of the numeric slopes a_j
    interactions: int = 0  # field pairs with a planted interaction
    interaction_std: float = 0.5
    bias: float = -1.6  # the logit's constant (data.base_ctr = its sigmoid)

    def vocabularies(self) -> np.ndarray:
        """V_f: geometric from `vocab` down to min(vocab, 4)."""
        if self.fields == 1:
            return np.array([self.vocab], np.int64)
        low = min(self.vocab, 4)
        logs = np.linspace(np.log(self.vocab), np.log(low), self.fields)
        return np.maximum(np.rint(np.exp(logs)).astype(np.int64), 1)

    def pairs(self) -> list[tuple[int, int]]:
        """The interacting field pairs: (F-2, F-1), (F-4, F-3), ... (small vocabularies)."""
        count = min(self.interactions, self.fields // 2)
        return [(self.fields - 2 - 2 * k, self.fields - 1 - 2 * k) for k in range(count)]


@dataclass
class ClickLogs:
    """Ids (n, fields + numeric) int64, clicks (n,) int64, planted click probabilities (n,)."""

    x: np.ndarray
    y: np.ndarray
    p: np.ndarray


def zipf_ranks(rng: np.random.Generator, n: int, vocab: int, s: float) -> np.ndarray:
    """n ranks in [1, vocab] with P(rank >= r) following the bounded power law of exponent s
    (the continuous inverse CDF, floored: O(n) memory whatever `vocab`)."""
    u = rng.random(n)
    top = float(vocab) + 1.0
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(top))
    else:
        x = (1.0 + u * (top ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    return np.clip(np.floor(x).astype(np.int64), 1, vocab)


def hashed_normal(keys: np.ndarray, seed: int, tag: int) -> np.ndarray:
    """A standard normal per 64-bit key, a pure function of (key, seed, tag) (Box-Muller)."""
    with np.errstate(over="ignore"):
        salt = splitmix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(tag))
        h1 = splitmix64(np.asarray(keys).view(np.uint64) ^ salt)
        h2 = splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / (1 << 53))  # (0, 1]: log is finite
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class _Numeric:
    """Each numeric field's law (mu, s, missing rate) and planted slope, centre and missing weight."""

    def __init__(self, spec: ClickLogSpec, seed: int):
        rng = np.random.default_rng([_NUMERIC, seed])
        k = spec.numeric
        self.mu, self.s = rng.uniform(0.0, 4.0, k), rng.uniform(0.5, 1.5, k)
        self.missing_rate = rng.uniform(0.0, 0.45, k)
        self.slope = rng.normal(0.0, spec.numeric_std, k)
        self.centre = np.log1p(np.exp(self.mu))  # about the median of log(1 + x)
        self.missing_weight = rng.normal(0.0, spec.numeric_std, k)


def generate(spec: ClickLogSpec, n: int, seed: int, split: str) -> ClickLogs:
    """`n` examples of split "train" or "test" (independent streams of the same law)."""
    tag = _TRAIN if split == "train" else _TEST
    numeric = _Numeric(spec, seed)
    vocabs = spec.vocabularies()
    width = spec.fields + spec.numeric
    x = np.empty((n, width), np.int64)
    y = np.empty(n, np.int64)
    p = np.empty(n, np.float64)
    for block, start in enumerate(range(0, n, BLOCK)):
        stop = min(start + BLOCK, n)
        rng = np.random.default_rng([tag, seed, block])
        x[start:stop], p[start:stop] = _block(spec, numeric, vocabs, rng, stop - start, seed)
        y[start:stop] = rng.random(stop - start) < p[start:stop]
    return ClickLogs(x, y, p)


def _block(spec, numeric, vocabs, rng, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((m, spec.fields + spec.numeric), np.int64)
    logit = np.full(m, spec.bias)
    for f in range(spec.fields):
        ranks = zipf_ranks(rng, m, int(vocabs[f]), spec.zipf)
        x[:, f] = field_ids(f, ranks - 1)
        scale = spec.cat_std * ranks.astype(np.float64) ** -spec.decay
        logit += scale * hashed_normal(x[:, f], seed, _WEIGHT)
    for a, b in spec.pairs():
        with np.errstate(over="ignore"):
            pair = splitmix64(x[:, a].view(np.uint64)) ^ x[:, b].view(np.uint64)
        logit += spec.interaction_std * hashed_normal(pair, seed, _PAIR)
    for j in range(spec.numeric):
        counts = np.floor(np.exp(numeric.mu[j] + numeric.s[j] * rng.standard_normal(m)))
        missing = rng.random(m) < numeric.missing_rate[j]
        t = np.log1p(counts)
        logit += np.where(missing, numeric.missing_weight[j], numeric.slope[j] * (t - numeric.centre[j]))
        x[:, spec.fields + j] = numeric_ids(j, numeric_buckets(counts, missing), spec.fields)
    return x, 1.0 / (1.0 + np.exp(-logit))


def spec_of(cfg) -> ClickLogSpec:
    """The law a `DataConfig` (data.name click_logs) describes."""
    return ClickLogSpec(fields=cfg.fields, numeric=cfg.numeric, vocab=cfg.vocab, zipf=cfg.zipf,
                        cat_std=cfg.weight_std, decay=cfg.rank_decay, numeric_std=cfg.numeric_std,
                        interactions=cfg.interactions, interaction_std=cfg.interaction_std,
                        bias=math.log(cfg.base_ctr / (1.0 - cfg.base_ctr)))
