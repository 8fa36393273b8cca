"""Telemetry shared by every role: duration windows, histogram arithmetic, TensorBoard event
files and Prometheus /metrics endpoints.

tensorboardX and prometheus-client are optional (`pip install -e ".[telemetry]"`): without them
the run goes on and says so in one line. Nothing here is on the push path: the shards' exact
staleness counters (ps/counters.py) are read at scrape or report time.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

# Upper bounds (ms) of the pull-to-push duration buckets: 20 per decade from 0.1 ms to 100 s,
# so a quantile read from merged buckets is at most 12.2% above the exact one. The last bucket
# (index len) counts everything above. A window sends only its non-empty buckets.
logger = logging.getLogger(__name__)
PER_DECADE = 20
DURATION_BUCKETS_MS = tuple(round(0.1 * 10 ** (i / PER_DECADE), 6) for i in range(6 * PER_DECADE + 1))
MAX_WINDOW_COUNT = 10**9  # more durations than any worker can time between two reports: malformed
# Prometheus staleness buckets (shard versions), as CONVENTIONS.md suggests; +Inf is added.
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------------------------
# Durations (pull to push), collected by a worker between two reports


def duration_bucket(ms: float) -> int:
    """Index of the DURATION_BUCKETS_MS bucket holding `ms` (len(...) when above the last)."""
    if ms <= DURATION_BUCKETS_MS[0]:
        return 0
    i = math.ceil(PER_DECADE * math.log10(ms / DURATION_BUCKETS_MS[0]) - 1e-9)
    return min(i, len(DURATION_BUCKETS_MS))


class DurationWindow:
    """Durations (seconds) observed since the last `flush`; cheap to add (one append).

    `flush(prefix)` returns what a worker sends to the chief (ReportMetrics values, all floats):
    ``PREFIX/count``, ``/sum_ms``, ``/max_ms``, exact ``/p50_ms`` and ``/p99_ms`` of the window,
    and ``PREFIX/b/I`` = durations in bucket I (only non-empty buckets), which the chief merges.
    """

    def __init__(self):
        self._seconds: list[float] = []

    def add(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def flush(self, prefix: str = "pull_to_push") -> dict[str, float]:
        values, self._seconds = sorted(self._seconds), []
        if not values:
            return {}
        ms = [v * 1e3 for v in values]
        out = {f"{prefix}/count": float(len(ms)), f"{prefix}/sum_ms": sum(ms), f"{prefix}/max_ms": ms[-1],
               f"{prefix}/p50_ms": _nearest_rank(ms, 50), f"{prefix}/p99_ms": _nearest_rank(ms, 99)}
        for v in ms:
            key = f"{prefix}/b/{duration_bucket(v)}"
            out[key] = out.get(key, 0.0) + 1.0
        return out


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(1, math.ceil(q / 100 * len(sorted_values))) - 1]


class DurationStats:
    """Merged duration windows (one worker's, or all): exact count, mean and max; p50/p99 read
    from the merged buckets (bucket upper bounds)."""

    def __init__(self):
        self.count, self.sum_ms, self.max_ms = 0, 0.0, 0.0
        self.buckets: dict[int, int] = {}

    def add_window(self, values: Mapping[str, float], prefix: str = "pull_to_push") -> bool:
        """Adds one flushed window (keys as `DurationWindow.flush`); False, changing nothing, when
        it has none or is malformed (the values come over the wire from a worker)."""
        try:
            count, sum_ms, max_ms, buckets = _parse_window(values, prefix)
        except (ValueError, OverflowError, TypeError):
            return False
        if not count:
            return False
        self.count += count
        self.sum_ms += sum_ms
        self.max_ms = max(self.max_ms, max_ms)
        for i, n in buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + n
        return True

    def merge(self, other: "DurationStats") -> None:
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        for i, n in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + n

    def quantile_ms(self, q: float) -> float:
        """Upper bound of the bucket holding the q-th percentile (nearest rank); the exact max
        for the overflow bucket and never above the max."""
        rank, seen = max(1, math.ceil(q / 100 * self.count)), 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                bound = DURATION_BUCKETS_MS[i] if i < len(DURATION_BUCKETS_MS) else self.max_ms
                return min(bound, self.max_ms)
        return self.max_ms

    def summary(self) -> dict:
        """count, mean_ms, p50_ms, p99_ms, max_ms (rounded to 4 significant digits)."""
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "mean_ms": _sig(self.sum_ms / self.count), "p50_ms": _sig(self.quantile_ms(50)),
                "p99_ms": _sig(self.quantile_ms(99)), "max_ms": _sig(self.max_ms)}


def _parse_window(values: Mapping[str, float], prefix: str) -> tuple[int, float, float, dict[int, int]]:
    """(count, sum_ms, max_ms, {bucket: count}) of a window; ValueError when inconsistent."""
    count = int(values.get(f"{prefix}/count", 0))
    sum_ms, max_ms = float(values.get(f"{prefix}/sum_ms", 0.0)), float(values.get(f"{prefix}/max_ms", 0.0))
    head, buckets = f"{prefix}/b/", {}
    for key, n in values.items():
        if key.startswith(head):
            buckets[int(key[len(head):])] = int(n)
    if (not 0 <= count <= MAX_WINDOW_COUNT or not (math.isfinite(sum_ms) and math.isfinite(max_ms)) or sum_ms < 0 or max_ms < 0
            or sum(buckets.values()) != count or any(not 0 <= i <= len(DURATION_BUCKETS_MS) or n < 0 for i, n in buckets.items())):
        raise ValueError(f"malformed {prefix} window")
    return count, sum_ms, max_ms, buckets


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def window_summary(values: Mapping[str, float], prefix: str = "pull_to_push") -> dict[str, float]:
    """The exact figures of one window, for a `worker` row (bucket counts left out)."""
    keep = ("count", "p50_ms", "p99_ms", "max_ms")
    out = {f"{prefix}/{k}": _sig(values[f"{prefix}/{k}"]) for k in keep if f"{prefix}/{k}" in values}
    if values.get(f"{prefix}/count"):
        out[f"{prefix}/mean_ms"] = _sig(values[f"{prefix}/sum_ms"] / values[f"{prefix}/count"])
    return out


def is_window_key(key: str, prefix: str = "pull_to_push") -> bool:
    return key.startswith(prefix + "/")


# ----------------------------------------------------------------------------------------------
# Cumulative integer histograms (staleness): differences between two reads


def histogram_delta(now: Mapping[int, int], before: Mapping[int, int] | None) -> dict[int, int]:
    """Counts added since `before`; when a count went down (a restarted shard's counters restart),
    the whole of `now`."""
    before = before or {}
    if any(now.get(s, 0) < n for s, n in before.items()):
        return {s: n for s, n in now.items() if n}
    return {s: n - before.get(s, 0) for s, n in now.items() if n - before.get(s, 0) > 0}


def cumulative_buckets(hist: Mapping[int, int], bounds: Iterable[int] = STALENESS_BUCKETS) -> list[tuple[str, int]]:
    """Prometheus histogram buckets [(le, cumulative count)], +Inf last, from {value: count}."""
    out, items = [], sorted(hist.items())
    for bound in bounds:
        out.append((str(float(bound)), sum(n for s, n in items if s <= bound)))
    out.append(("+Inf", sum(n for _, n in items)))
    return out


# ----------------------------------------------------------------------------------------------
# TensorBoard (tensorboardX)


class TensorBoard:
    """Scalars and exact histograms written as event files in `logdir` (tensorboardX).

    Without tensorboardX, `TensorBoard.open` prints one notice and returns None.
    """

    def __init__(self, writer):
        self._writer = writer

    @classmethod
    def open(cls, logdir: str | Path, notice: Callable[[str], None] | None = None) -> "TensorBoard | None":
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            (notice or _stderr)("telemetry.tensorboard is on but tensorboardX is not installed "
                                "(pip install 'asyncps[telemetry]'); no event files are written")
            return None
        return cls(SummaryWriter(logdir=str(logdir), flush_secs=10))

    def scalars(self, step: int, values: Mapping[str, float], walltime: float | None = None) -> None:
        for tag, value in values.items():
            if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), int(step), walltime=walltime)

    def histogram(self, tag: str, step: int, hist: Mapping[int, int], walltime: float | None = None) -> None:
        """An integer histogram {value: count}, exactly: one bucket per integer up to the max."""
        hist = {int(s): int(n) for s, n in hist.items() if n}
        if not hist:
            return
        top = max(hist)
        counts = [hist.get(s, 0) for s in range(top + 1)]
        self._writer.add_histogram_raw(
            tag, min=min(hist), max=top, num=sum(counts), sum=sum(s * n for s, n in hist.items()),
            sum_squares=sum(s * s * n for s, n in hist.items()), bucket_limits=[s + 0.5 for s in range(top + 1)],
            bucket_counts=counts, global_step=int(step), walltime=walltime)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _stderr(message: str) -> None:
    logger.warning(f"asyncps: {message}")


# ----------------------------------------------------------------------------------------------
# Prometheus (prometheus-client)


def metrics_port(base: int, role: str, index: int, num_ps: int) -> int:
    """The /metrics port of a process: chief `base`, shard i `base + 1 + i`, worker i
    `base + 1 + num_ps + i`; 0 when `base` is 0 (off)."""
    if not base:
        return 0
    return base + {"chief": 0, "ps": 1 + index, "worker": 1 + num_ps + index}[role]


class MetricsServer:
    """One /metrics HTTP endpoint serving `collect()` of the given collectors (own registry, plus
    the standard process metrics)."""

    def __init__(self, server, thread, port: int):
        self._server, self._thread, self.port = server, thread, port

    @classmethod
    def start(cls, collectors: Iterable, port: int, host: str = "127.0.0.1", who: str = "asyncps",
              notice: Callable[[str], None] | None = None) -> "MetricsServer | None":
        """Serves on `port` (0: a free one); None, after one notice, when prometheus-client is
        missing or the port is taken (telemetry never stops a run)."""
        notice = notice or _stderr
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        except ImportError:
            notice(f"{who}: telemetry.prometheus_port is set but prometheus-client is not installed "
                   f"(pip install 'asyncps[telemetry]'); no /metrics endpoint")
            return None
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        for collector in collectors:
            registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            notice(f"{who}: cannot serve /metrics on {host}:{port} ({exc.strerror}); no /metrics endpoint")
            return None
        return cls(server, thread, server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FunctionCollector:
    """A prometheus-client collector whose `collect` calls a function returning metric families
    (built at scrape time from state the process keeps anyway: no cost per push)."""

    def __init__(self, families: Callable[[], Iterable]):
        self._families = families

    def collect(self):
        yield from self._families()
