"""Checkpoint pause time and its throughput cost; evaluation's cost to the workers.

    python bench/checkpoint.py [--config configs/mnist_mlp.yaml] [--steps 1500] [--reps 2]
                               [--every 100] [--evals 50]

Runs `asyncps launch` with the same config in four settings, interleaved per repetition so
machine noise hits all alike, and prints medians:

  baseline      no checkpoints, evaluation every `--steps` (i.e. never during training)
  checkpoints   a checkpoint every `--every` steps
  eval small    evaluation every `--evals` steps (the chief pulls and scores, off the workers' path)
  eval large    evaluation every `--steps` steps

Throughput is the steady-state global steps/s between the chief's progress rows after the
first 10% of the steps. Pause time is the chief's measure per checkpoint (pause all shards,
snapshot all, resume), from the `checkpoint` rows of metrics.jsonl. The throughput cost of
checkpoints is (baseline - checkpoints) / baseline; the pause share of wall time is
sum(pause) / run time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch(config: str, run_dir: Path, steps: int, *overrides: str) -> list[dict]:
    args = ["launch", config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=50", *overrides]
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"asyncps {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steady_rate(rows: list[dict], steps: int) -> float:
    progress = [r for r in rows if r["kind"] == "progress" and r["step"] >= steps // 10]
    first, last = progress[0], progress[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "mnist_mlp.yaml"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--every", type=int, default=100, help="checkpoint every this many steps")
    p.add_argument("--evals", type=int, default=50, help="evaluate every this many steps (the 'small' setting)")
    a = p.parse_args(argv)
    settings = {
        "baseline": [f"train.eval_every={a.steps}"],
        "checkpoints": [f"train.eval_every={a.steps}", f"checkpoint.every_steps={a.every}"],
        "eval small": [f"train.eval_every={a.evals}"],
        "eval large": [f"train.eval_every={a.steps}"],
    }
    rates: dict[str, list[float]] = {k: [] for k in settings}
    pauses, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for name, overrides in settings.items():
                rows = launch(a.config, Path(tmp) / f"{rep}-{name.replace(' ', '_')}", a.steps, *overrides)
                rates[name].append(steady_rate(rows, a.steps))
                ckpts = [r for r in rows if r["kind"] == "checkpoint"]
                pauses += [r["pause_ms"] for r in ckpts]
                sizes += [r["bytes"] for r in ckpts]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"config {Path(a.config).name}, {a.steps} steps, {a.reps} reps (medians of steady-state global steps/s)")
    for name, value in med.items():
        print(f"  {name:<12} {value:8.1f} steps/s   runs: {', '.join(f'{x:.1f}' for x in rates[name])}")
    if pauses:
        pauses.sort()
        print(f"  checkpoint pause: median {statistics.median(pauses):.1f} ms, p90 {pauses[int(0.9 * (len(pauses) - 1))]:.1f} ms, "
              f"max {pauses[-1]:.1f} ms over {len(pauses)} checkpoints of {statistics.median(sizes) / 2**20:.2f} MiB")
    print(f"  throughput cost of a checkpoint every {a.every} steps: "
          f"{100 * (med['baseline'] - med['checkpoints']) / med['baseline']:+.1f}%")
    print(f"  evaluation every {a.evals} vs every {a.steps} steps: "
          f"{100 * (med['eval large'] - med['eval small']) / med['eval large']:+.1f}% slower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
