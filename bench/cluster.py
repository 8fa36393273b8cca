"""Cluster throughput next to single-process training, side by side in one run.

    python bench/cluster.py [--steps 1500] [--reps 3] [--workers 2] [--shards 1] [--config configs/mnist_mlp.yaml]
                            [--variant cluster.prefetch=true ...]

Each repetition runs `asyncps train` and then `asyncps launch` (for every workers x shards pair)
on the same config, interleaved so machine noise hits all of them alike, and prints medians.
Steady-state rates only: the single-process rate excludes evaluation (report.json's
`throughput`), the cluster rate is measured between the chief's progress rows after the first
10% of the steps (start-up and the final evaluation excluded). The final test accuracy of every
run (report.json's `final`) is printed next to the rate. Each `--variant` (overrides,
space-separated) adds the launches once more with those overrides, in the same interleaving;
a token ``env:NAME=VALUE`` sets an environment variable instead (``env:PYTHONPATH=DIR`` runs
another checkout's code, e.g. the code before a change, side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def asyncps(*args: str) -> None:
    env = dict(os.environ)
    env.update(a[4:].split("=", 1) for a in args if a.startswith("env:"))
    args = tuple(a for a in args if not a.startswith("env:"))
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", *args], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"asyncps {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


ACCURACY: dict[str, list[float]] = {}  # setting -> final test accuracy of each run (report.json)


def _final_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "report.json").read_text()).get("final", {}).get("accuracy", float("nan"))


def single_process_rate(config: str, steps: int, run_dir: Path) -> float:
    asyncps("train", config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=0")
    ACCURACY.setdefault("train", []).append(_final_accuracy(run_dir))
    return json.loads((run_dir / "report.json").read_text())["throughput"]["steps_per_second"]


def cluster_rate(config: str, steps: int, workers: int, shards: int, run_dir: Path, overrides: tuple = ()) -> float:
    asyncps("launch", config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=0",
            f"cluster.workers={workers}", f"cluster.ps={shards}", "train.log_every=50", *overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [r for r in rows if r["kind"] == "progress" and r["step"] >= steps // 10]
    first, last = progress[0], progress[-1]
    ACCURACY.setdefault(f"launch w={workers} ps={shards}" + (f" {' '.join(overrides)}" if overrides else ""), []).append(
        _final_accuracy(run_dir))
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_mlp.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--shards", default="1", help="comma-separated shard counts")
    parser.add_argument("--variant", action="append", default=[], help="overrides for extra launches, e.g. cluster.prefetch=true")
    args = parser.parse_args()
    shapes = [(int(w), int(s)) for s in args.shards.split(",") for w in args.workers.split(",")]
    rates: dict[str, list[float]] = {"train": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            rates["train"].append(single_process_rate(args.config, args.steps, Path(tmp, f"train{rep}")))
            for v, variant in enumerate([""] + args.variant):
                for w, s in shapes:
                    key = f"launch w={w} ps={s}" + (f" {variant}" if variant else "")
                    run_dir = Path(tmp, f"launch{rep}-{w}-{s}-{v}")
                    rates.setdefault(key, []).append(cluster_rate(args.config, args.steps, w, s, run_dir, tuple(variant.split())))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    base = statistics.median(rates["train"])
    print(f"\n{args.config}, {args.steps} steps, {args.reps} reps (medians, steps/s)")
    width = max(22, *map(len, rates))
    print(f"{'setting':<{width}} {'steps/s':>9} {'vs train':>9} {'accuracy (median, min-max)':>28}")
    for key, values in rates.items():
        med = statistics.median(values)
        acc = ACCURACY.get(key, [float("nan")])
        print(f"{key:<{width}} {med:>9.1f} {med / base:>9.2f} {statistics.median(acc):>12.4f} "
              f"({min(acc):.4f}-{max(acc):.4f})")
    print("per rep (steps/s): " + json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()}))
    print("per rep (accuracy): " + json.dumps(ACCURACY))


if __name__ == "__main__":
    main()
