"""Tables for docs/staleness.md from the simulation sweeps' run folders (no runs started here).

    python bench/staleness_tables.py law SWEEP_DIR        # the staleness law, M = 1..64
    python bench/staleness_tables.py softsync SWEEP_DIR   # n-softsync: updates and gradients to target

`law`: per worker count M (async, equal exponential compute times), pooled over the seeds: mean
staleness against M - 1, P(tau = 0) against 1/M, and the total-variation distance between the
measured histogram and the geometric law P(tau = k) = (1 - p) p^k, p = (M - 1) / M (Mitliagkas et
al. 2016), the geometric's mass beyond the largest k seen included.

`wplot OUT.png SWEEP...`: for W-workers-per-clock sweeps (axes optimizer, staleness.workers,
staleness.s), a bar chart per sweep of the steps to target at s = 4 over those at s = 0 (same
optimizer, W and seed; median and min-max over seeds); needs matplotlib.

`softsync`: per (n, staleness policy): c = M // n, mean staleness (Zhang et al.: about n; here
exactly (M - 1) / c in expectation), updates to target (median [min-max] over seeds), gradients
to target (updates x c: the paper's measure, data passes), final accuracy.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def runs(sweep: Path):
    with open(sweep / "results.csv") as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok":
                continue
            report = json.loads((Path(row["run_dir"]) / "report.json").read_text())
            yield row, report


def spread(values) -> str:
    values = [v for v in values]
    if any(v is None for v in values):
        done = sorted(v for v in values if v is not None)
        med = statistics.median([v if v is not None else float("inf") for v in values])
        shown = "> budget" if med == float("inf") else f"{med:g}"
        return f"{shown} [{done[0]:g}–> budget]" if done else "> budget"
    return f"{statistics.median(values):g} [{min(values):g}–{max(values):g}]"


def law(sweep: Path) -> None:
    groups: dict[int, list] = {}
    for row, report in runs(sweep):
        m = report["config"]["staleness"]["simulate"]["workers"]
        groups.setdefault(m, []).append((row, report))
    print("| M | seeds | gradients | mean staleness | M − 1 | P(τ = 0) | 1/M | TV to geometric | final metric |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in sorted(groups):
        hist: dict[int, int] = {}
        for _, report in groups[m]:
            for k, v in report["staleness"]["histogram"].items():
                hist[int(k)] = hist.get(int(k), 0) + v
        n = sum(hist.values())
        mean = sum(k * v for k, v in hist.items()) / n
        p = (m - 1) / m
        top = max(hist)
        geo = [(1 - p) * p**k for k in range(top + 1)] if m > 1 else [1.0] + [0.0] * top
        tv = 0.5 * (sum(abs(hist.get(k, 0) / n - geo[k]) for k in range(top + 1)) + max(0.0, 1 - sum(geo)))
        metric = next(k for k in groups[m][0][0] if k.startswith("final_") and k != "final_loss")
        acc = [float(r[metric]) for r, _ in groups[m]]
        print(f"| {m} | {len(groups[m])} | {n} | {mean:.3f} | {m - 1} | {hist.get(0, 0) / n:.4f} | {1 / m:.4f} | "
              f"{tv:.3f} | {metric[6:]} {spread(acc)} |")


def softsync(sweep: Path) -> None:
    groups: dict[tuple, list] = {}
    for row, report in runs(sweep):
        cfg = report["config"]
        sim = cfg["staleness"]["simulate"]
        key = (sim["mode"], sim["n"] if sim["mode"] == "softsync" else 0, cfg["optimizer"]["staleness_policy"]["name"])
        groups.setdefault(key, []).append((row, report, sim))
    print("| protocol | lr | c | mean staleness | (M − 1)/c | updates to target | gradients to target | final accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(groups, key=lambda k: (k[0] != "sync", k[1], k[2])):
        mode, n, policy = key
        items = groups[key]
        sim = items[0][2]
        m = sim["workers"]
        c = m - sim["backup_workers"] if mode == "sync" else max(1, m // n)
        steps = [int(r["steps_to_target"]) if r["steps_to_target"] else None for r, _, _ in items]
        grads = [s * c if s is not None else None for s in steps]
        means = [report["staleness"]["mean"] for _, report, _ in items]
        acc = [float(r["final_accuracy"]) for r, _, _ in items]
        name = "hardsync (sync)" if mode == "sync" else f"{n}-softsync"
        lr = "α/τ" if policy == "lr_scale" else "α"
        expected = "0" if mode == "sync" else f"{(m - 1) / c:.3g}"
        print(f"| {name} | {lr} | {c} | {statistics.mean(means):.3g} | {expected} | {spread(steps)} | "
              f"{spread(grads)} | {spread(acc)} |")


def wplot(out: str, *sweeps: Path, s_num: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(3.6 * len(sweeps), 3.0), sharey=True, squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        steps: dict[tuple, dict] = {}
        for row, report in runs(sweep):
            cfg = report["config"]
            key = (cfg["optimizer"]["name"], cfg["staleness"]["workers"])
            budget, model = cfg["train"]["max_steps"], cfg["model"]["name"]
            value = int(row["steps_to_target"]) if row["steps_to_target"] else 2 * budget  # not reached
            steps.setdefault(key, {}).setdefault(cfg["staleness"]["s"], {})[int(row["seed"])] = value
        names = sorted({k[0] for k in steps}, key=["sgd", "momentum", "adam"].index)
        ws = sorted({k[1] for k in steps})
        for j, w in enumerate(ws):
            med, lo, hi = [], [], []
            for name in names:
                by_s = steps[(name, w)]
                ratios = [by_s[s_num][seed] / by_s[0][seed] for seed in by_s[0] if seed in by_s.get(s_num, {})]
                med.append(statistics.median(ratios))
                lo.append(med[-1] - min(ratios))
                hi.append(max(ratios) - med[-1])
            x = [i + (j - (len(ws) - 1) / 2) * 0.35 for i in range(len(names))]
            ax.bar(x, med, width=0.35, yerr=[lo, hi], capsize=3, label=f"W = {w}")
        ax.set_xticks(range(len(names)), names)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"MNIST {model}, {budget} steps (not reached: 2 x budget)", fontsize=8)
    axes[0][0].set_ylabel(f"steps to target, s={s_num} / s=0")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    if sys.argv[1] == "wplot":
        wplot(sys.argv[2], *[Path(p) for p in sys.argv[3:]])
        sys.exit(0)
    what, folders = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    for folder in folders:
        {"law": law, "softsync": softsync}[what](folder)
