"""The plots of a sweep (needs matplotlib: `pip install asyncps[plot]`).

- ``metric_vs_steps.png`` and ``metric_vs_seconds.png``: the target metric of every evaluation
  (metrics.jsonl `eval` and `final` rows), one colour per setting, one line per seed;
- ``staleness_hist.png``: the measured staleness histogram of each setting (all seeds merged),
  as fractions of its pushes;
- ``steps_to_target.png``: per setting, the median over seeds of steps to target divided by
  those of the matching staleness-0 setting, same seed (min–max as error bars; a run that never
  reached the target counts as twice the budget, and its bar is hatched).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asyncps.histogram import merge_histograms  # noqa: E402
from asyncps.runs import read_metrics  # noqa: E402
from asyncps.sweep import Setting, baselines, read_report  # noqa: E402

DPI = 80


def plot_sweep(out: Path, runs: list[tuple[str, int, Path]], settings: list[tuple[str, tuple]]) -> list[Path]:
    """Writes the four plots into `out`; returns their paths. `runs`: (setting name, seed, run_dir);
    `settings`: (name, axis values) in grid order."""
    names = [name for name, _values in settings]
    loaded = []
    for setting, seed, run_dir in runs:
        report = read_report(run_dir)
        if report is None:
            continue
        metrics_path = Path(run_dir) / "metrics.jsonl"
        rows = read_metrics(metrics_path) if metrics_path.exists() else []
        loaded.append((setting, seed, report, rows))
    if not loaded:
        return []
    metric = loaded[0][2].get("target", {}).get("metric") or "accuracy"
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(names)}
    written = [
        _curves(out / "metric_vs_steps.png", loaded, names, colors, metric, "step", "steps (updates applied)"),
        _curves(out / "metric_vs_seconds.png", loaded, names, colors, metric, "time", "seconds"),
        _histograms(out / "staleness_hist.png", loaded, names, colors),
        _bars(out / "steps_to_target.png", loaded, settings, colors, metric),
    ]
    return [p for p in written if p is not None]


def _curves(path, loaded, settings, colors, metric, x_key, x_label):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for setting, _seed, _report, rows in loaded:
        points = [(r[x_key], r[metric]) for r in rows if r.get("kind") in ("eval", "final") and metric in r]
        if not points:
            continue
        points.sort()
        label = None if setting in labelled else setting
        labelled.add(setting)
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[setting], alpha=0.8, lw=1.3,
                marker=".", label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    if metric in ("loss", "mse"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{metric} vs {x_label.split()[0]} (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _histograms(path, loaded, settings, colors):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in settings:
        hists = [{int(k): v for k, v in r.get("staleness", {}).get("histogram", {}).items()}
                 for s, _seed, r, _rows in loaded if s == setting]
        merged = merge_histograms(*hists)
        total = sum(merged.values())
        if not total:
            continue
        xs = list(range(max(merged) + 2))
        ax.step(xs, [merged.get(x, 0) / total for x in xs], where="mid", color=colors[setting], label=setting)
    ax.set_xlabel("staleness (updates not seen)")
    ax.set_ylabel("fraction of pushes")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("measured staleness (all seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _bars(path, loaded, settings, colors, metric):
    """Per setting: median over seeds of steps to target / the matching staleness-0 setting's."""
    steps = {}  # (setting, seed) -> steps to target (inf: not reached)
    rows_of: dict[str, list[dict]] = {}  # setting -> one row per seed, as baselines() takes them
    budget = 1
    for setting, seed, report, _rows in loaded:
        t = report.get("target", {})
        steps[(setting, seed)] = t.get("step") if t.get("reached") else math.inf
        rows_of.setdefault(setting, []).append(
            {"status": "ok", "staleness_max": report.get("staleness", {}).get("max", 0)})
        budget = max(budget, report.get("config", {}).get("train", {}).get("max_steps", 0))
    objs = [Setting(name, values) for name, values in settings]
    base_of = baselines(objs, rows_of)
    shown, heights, lows, highs, hatched = [], [], [], [], []
    for name, _values in settings:
        base = base_of.get(name)
        seeds = [seed for (s, seed) in steps if s == name]
        if not seeds:
            continue
        ratios = []
        for seed in seeds:
            b = steps.get((base, seed)) if base else None
            denom = b if b is not None and math.isfinite(b) else (None if base else 1.0)
            if denom:
                ratios.append(min(steps[(name, seed)], 2 * budget) / denom)
        if not ratios:
            continue
        cap = 2 * budget / min(v for v in steps.values() if math.isfinite(v)) if any(
            math.isfinite(v) for v in steps.values()) else 2.0
        med = statistics.median(ratios)
        shown.append(name)
        heights.append(min(med, cap))
        lows.append(min(min(ratios), cap))
        highs.append(min(max(ratios), cap))
        hatched.append(any(math.isinf(steps[(name, seed)]) for seed in seeds))
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(shown):
        ax.bar(i, heights[i], color=colors[name], hatch="//" if hatched[i] else None, edgecolor="black", lw=0.5)
        if highs[i] > lows[i]:
            ax.errorbar(i, heights[i], yerr=[[heights[i] - lows[i]], [highs[i] - heights[i]]], color="black", capsize=3)
    ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=7)
    any_base = any(base_of.values())
    ax.set_ylabel("steps to target / matching staleness-0 setting" if any_base else "steps to target")
    if any_base:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"steps to the {metric} target (median, min–max; hatched: some seed never reached it)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
