"""Compute-time and delay distributions: one module for `delay:` and the event simulation.

A `delay:` section (`asyncps.config.DelayConfig`) names a distribution of milliseconds; the
cluster's workers sleep a draw after each gradient (`asyncps.worker.delays.DelayModel`) and the
simulation (`asyncps.cli.simulate`) takes a draw as a virtual worker's compute time. Both build
the sampler here, so the same section means the same numbers in both places (the draws of worker
i come from the same seeded stream in both).

Kinds (means in milliseconds; every kind's mean and variance are in closed form, `mean_ms()` and
`variance_ms2()`, which the tests check the samples against):

- ``none``: 0;  ``constant``: ``mean_ms``;
- ``uniform``: on [``min_ms``, ``max_ms``];
- ``exponential``: mean ``mean_ms`` (variance mean^2);
- ``gamma``: shape k = ``shape``, scale ``mean_ms / k`` (variance mean^2 / k; k = 1 is the
  exponential);
- ``lognormal``: mean ``mean_ms``, the log of a draw has std ``sigma``
  (mu = ln(mean_ms) - sigma^2 / 2; variance (e^(sigma^2) - 1) mean^2);
- ``pareto``: the classical Pareto (type I) with tail index alpha = ``alpha`` > 1 and mean
  ``mean_ms``: scale x_m = mean (alpha - 1) / alpha, P(X > x) = (x_m / x)^alpha for x >= x_m
  (variance x_m^2 alpha / ((alpha - 1)^2 (alpha - 2)), infinite for alpha <= 2);
- ``trace``: a file of measured durations in SECONDS, one sequence per worker, replayed in
  order and cycled when exhausted; worker i replays sequence i mod (number of sequences).
  Formats: JSON (a list of lists, a list of numbers for every worker, or {"0": [...], ...}) or
  text with one worker's sequence per line, numbers separated by spaces or commas ('#' starts
  a comment). Every number must be finite and 0 or more.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from asyncps.config import DelayConfig
from asyncps.errors import ConfigError

MAX_TRACE_BYTES = 64 << 20  # a trace file larger than this is refused unread


class Distribution:
    """Draws in milliseconds of one worker's distribution; `draw_ms(rng)` takes one."""

    def __init__(self, cfg: DelayConfig, worker: int = 0, trace: list[np.ndarray] | None = None):
        self.cfg, self.kind, self.worker = cfg, cfg.kind, worker
        self._pos = 0
        self._seq = np.empty(0)  # the trace kind's sequence (ms); empty for every other kind
        if cfg.kind == "trace":
            sequences = trace if trace is not None else load_trace(cfg.trace)
            self._seq = np.asarray(sequences[worker % len(sequences)], dtype=np.float64) * 1000.0
        elif cfg.kind == "pareto":
            self._xm = cfg.mean_ms * (cfg.alpha - 1.0) / cfg.alpha
        elif cfg.kind == "lognormal" and cfg.mean_ms > 0:
            self._mu = math.log(cfg.mean_ms) - cfg.sigma**2 / 2

    def draw_ms(self, rng: np.random.Generator) -> float:
        """One draw (milliseconds). The kinds that existed before (constant .. lognormal) draw the
        very numbers they always drew from the same RNG."""
        c, kind = self.cfg, self.kind
        if kind == "none":
            return 0.0
        if kind == "constant":
            return c.mean_ms
        if kind == "uniform":
            return float(rng.uniform(c.min_ms, c.max_ms))
        if c.mean_ms <= 0 and kind != "trace":
            return 0.0
        if kind == "exponential":
            return float(rng.exponential(c.mean_ms))
        if kind == "gamma":
            return float(rng.gamma(c.shape, c.mean_ms / c.shape))
        if kind == "lognormal":
            return float(rng.lognormal(self._mu, c.sigma))
        if kind == "pareto":
            return float(self._xm * (1.0 + rng.pareto(c.alpha)))  # numpy's pareto is Lomax: shift by 1
        if kind == "trace":
            value = float(self._seq[self._pos % len(self._seq)])
            self._pos += 1
            return value
        raise ValueError(f"unknown delay kind {kind!r}")  # the config schema prevents this

    def mean_ms(self) -> float:
        """The distribution's mean (trace: the mean of this worker's sequence)."""
        c, kind = self.cfg, self.kind
        if kind == "none":
            return 0.0
        if kind == "uniform":
            return (c.min_ms + c.max_ms) / 2
        if kind == "trace":
            return float(self._seq.mean())
        return c.mean_ms

    def variance_ms2(self) -> float:
        """The distribution's variance in ms^2 (math.inf for a Pareto tail index <= 2)."""
        c, kind, m = self.cfg, self.kind, self.cfg.mean_ms
        if kind in ("none", "constant"):
            return 0.0
        if kind == "uniform":
            return (c.max_ms - c.min_ms) ** 2 / 12
        if kind == "exponential":
            return m * m
        if kind == "gamma":
            return m * m / c.shape
        if kind == "lognormal":
            return (math.exp(c.sigma**2) - 1.0) * m * m
        if kind == "pareto":
            if c.alpha <= 2:
                return math.inf
            return self._xm**2 * c.alpha / ((c.alpha - 1) ** 2 * (c.alpha - 2))
        if kind == "trace":
            return float(self._seq.var())
        raise ValueError(f"unknown delay kind {kind!r}")


_TRACE_CACHE: dict[tuple, list[np.ndarray]] = {}


def load_trace(path: str | None) -> list[np.ndarray]:
    """The per-worker sequences (seconds) of a trace file; ConfigError naming the problem."""
    if not path:
        raise ConfigError("delay kind trace needs `trace`, a file of per-worker sequences of seconds")
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(f"trace {path}: cannot read ({exc.strerror})") from None
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _TRACE_CACHE:
        return _TRACE_CACHE[key]
    if st.st_size > MAX_TRACE_BYTES:
        raise ConfigError(f"trace {path}: larger than {MAX_TRACE_BYTES >> 20} MiB")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"trace {path}: cannot read as UTF-8 text ({exc})") from None
    sequences = parse_trace(text, str(path))
    _TRACE_CACHE[key] = sequences
    return sequences


def parse_trace(text: str, source: str = "trace") -> list[np.ndarray]:
    """Sequences from a trace's text (see the module docstring for the formats)."""
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{source}: not valid JSON ({str(exc)[:120]})") from None
        if isinstance(raw, dict):
            try:
                raw = [raw[k] for k in sorted(raw, key=int)]
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: a JSON object's keys must be worker indices (\"0\", \"1\", ...)") from None
        if isinstance(raw, list) and raw and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raw = [raw]
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: expected a list of per-worker lists of seconds")
        rows = raw
    else:
        rows = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    rows.append([float(x) for x in re.split(r"[\s,]+", line) if x])
                except ValueError as exc:
                    raise ConfigError(f"{source}: line {len(rows) + 1}: {exc}") from None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise ConfigError(f"{source}: worker {i}'s sequence must be a non-empty list of seconds")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise ConfigError(f"{source}: worker {i}'s sequence must hold numbers only")
        a = np.asarray(row, dtype=np.float64)
        if not np.all(np.isfinite(a)) or (a < 0).any():
            raise ConfigError(f"{source}: worker {i}'s durations must be finite and 0 or more")
        out.append(a)
    if not out:
        raise ConfigError(f"{source}: no sequence in the trace")
    return out
