"""Delay injection: a worker sleeps after computing a gradient and before pushing it.

Real asynchrony then produces the staleness: the longer a worker's step, the more updates the
other workers apply between its read and its push. The delay of each step is drawn from the
YAML's `delay` section with an RNG seeded by (run seed, worker index), so a run is reproducible
worker by worker and no two workers draw the same sequence.

Distributions (milliseconds; ``asyncps.worker.distributions``, shared with the simulation):
``none``, ``constant``, ``uniform``, ``exponential``, ``gamma``, ``lognormal``, ``pareto`` and
``trace`` (a file of measured per-worker durations, in seconds, replayed in order).

A straggler (``delay.straggler.worker``) stretches its whole step, compute included, to
``factor`` times: it sleeps ``factor * d + (factor - 1) * compute_seconds`` where `d` is its
drawn delay; with ``pause_every: n`` it also sleeps ``pause_ms`` after every n-th step.
"""
from __future__ import annotations

import threading

import numpy as np

from asyncps.config import DelayConfig, StalenessConfig
from asyncps.worker.distributions import Distribution

DELAY_STREAM = 0xDE1A7  # keeps the delay RNG apart from the worker's data and dropout RNGs


class DelayModel:
    """The delays of one worker; `seconds(step, compute_seconds)` gives the sleep of a step."""

    def __init__(self, cfg: DelayConfig, worker: int, seed: int):
        self.cfg, self.worker = cfg, worker
        self.rng = np.random.default_rng([seed, worker, DELAY_STREAM])
        self.distribution = Distribution(cfg, worker)
        s = cfg.straggler
        self.straggler = s if s is not None and s.worker == worker else None

    @property
    def active(self) -> bool:
        """False when every step's sleep is 0 (the loop then skips the call entirely)."""
        s = self.straggler
        return self.cfg.kind != "none" or (s is not None and (s.factor > 1 or (s.pause_every > 0 and s.pause_ms > 0)))

    def draw_ms(self) -> float:
        """One base delay in milliseconds, before any straggler stretch."""
        return self.distribution.draw_ms(self.rng)

    def seconds(self, step: int, compute_seconds: float = 0.0) -> float:
        """The sleep after this worker's `step`-th gradient (0-based), which took `compute_seconds`."""
        delay = self.draw_ms() / 1000.0
        s = self.straggler
        if s is None:
            return delay
        delay = s.factor * delay + (s.factor - 1.0) * max(compute_seconds, 0.0)
        if s.pause_every and (step + 1) % s.pause_every == 0:
            delay += s.pause_ms / 1000.0
        return delay

    def wait(self, step: int, compute_seconds: float, stop: threading.Event | None = None) -> float:
        """Sleeps the step's delay (cut short when `stop` is set); returns the delay drawn."""
        delay = self.seconds(step, compute_seconds)
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                threading.Event().wait(delay)
        return delay


# ----------------------------------------------------------------------------------------------
# Controlled staleness: the staleness itself, drawn, instead of delays that produce it

STALENESS_STREAM = 0x57A1E  # keeps the staleness draws apart from the data, dropout and delay RNGs


def staleness_pmf(cfg: StalenessConfig) -> np.ndarray:
    """P(r = k) for k = 0..s_max, from the `staleness` section (see StalenessConfig)."""
    pmf: np.ndarray
    if cfg.distribution == "constant":
        pmf = np.zeros(cfg.s + 1)
        pmf[cfg.s] = 1.0
    elif cfg.distribution == "uniform":
        pmf = np.full(cfg.s + 1, 1.0)
    elif cfg.distribution == "geometric":
        pmf = cfg.p * (1.0 - cfg.p) ** np.arange(cfg.s + 1)
    elif cfg.distribution == "histogram":
        pmf = np.zeros(max(cfg.histogram) + 1)
        for k, w in cfg.histogram.items():
            pmf[k] = w
    else:
        raise ValueError(f"unknown staleness distribution {cfg.distribution!r}")  # the schema prevents this
    return pmf / pmf.sum()


class StalenessSampler:
    """Seeded draws of the staleness r of each gradient: the same seed gives the same sequence."""

    def __init__(self, cfg: StalenessConfig, seed: int, worker: int = 0):
        self.pmf = staleness_pmf(cfg)
        self.cdf = np.cumsum(self.pmf)
        self.s_max = len(self.pmf) - 1
        self.rng = np.random.default_rng([seed, worker, STALENESS_STREAM])

    @property
    def mean(self) -> float:
        return float(np.dot(np.arange(self.s_max + 1), self.pmf))

    def draw(self) -> int:
        """The next r."""
        return min(int(np.searchsorted(self.cdf, self.rng.random(), side="right")), self.s_max)
