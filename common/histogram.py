"""Summaries of integer histograms (staleness counts), exact, without keeping every sample."""
from __future__ import annotations

from collections.abc import Mapping


def merge_histograms(*histograms: Mapping[int, int]) -> dict[int, int]:
    """Add count histograms {value: count} together."""
    total: dict[int, int] = {}
    for hist in histograms:
        for value, count in hist.items():
            total[int(value)] = total.get(int(value), 0) + int(count)
    return dict(sorted(total.items()))


def percentile(hist: Mapping[int, int], q: float) -> int:
    """The smallest value v with at least q% of the samples <= v (nearest-rank method)."""
    n = sum(hist.values())
    if n == 0:
        return 0
    rank = max(1, -(-q * n // 100))  # ceil(q/100 * n), at least the first sample
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist)


def summarize(hist: Mapping[int, int]) -> dict:
    """count, mean, p50, p90, p99, max and the histogram itself, as report.json carries them.

    >>> summarize({0: 2, 1: 1, 5: 1})["p50"], summarize({0: 2, 1: 1, 5: 1})["mean"]
    (0, 1.5)
    """
    hist = {int(k): int(v) for k, v in hist.items() if v}
    n = sum(hist.values())
    mean = sum(k * v for k, v in hist.items()) / n if n else 0.0
    return {
        "count": n,
        "mean": mean,
        "p50": percentile(hist, 50),
        "p90": percentile(hist, 90),
        "p99": percentile(hist, 99),
        "max": max(hist) if hist else 0,
        "histogram": {str(k): v for k, v in sorted(hist.items())},
    }
