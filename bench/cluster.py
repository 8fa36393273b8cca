"""Cluster throughput next to single-process training, side by side in one run.

    python bench/cluster.py [--steps 1500] [--reps 3] [--workers 2] [--shards 1] [--config configs/mnist_mlp.yaml]
                            [--variant cluster.prefetch=true ...]

Each repetition runs `asyncps train` and then `asyncps launch` (for every workers x shards pair)
on the same config, interleaved so machine noise hits all of them alike, and prints medians.
Steady-state rates only: the single-process rate excludes evaluation (report.json's
`throughput`), the cluster rate is measured between the chief's progress rows after the first
10% of the steps (start-up and the final evaluation excluded). The final test accuracy of every
run (report.json's `final`) is printed next to the rate. CPU: every process's CPU time (from
/proc, all threads) is sampled when a run passes 10% and 90% of its steps, which gives CPU
milliseconds per step by role (train; worker, ps, chief) in the steady state: a number that moves
far less with the machine's load than steps/s, and bounds the rate a run could reach on this
machine's cores (printed as cores x 1000 / total; `train` uses one core). Each `--variant` (overrides,
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


CPU: dict[str, list[dict[str, float]]] = {}  # setting -> per run: CPU ms per step by role (steady state)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process, all its threads (from /proc); NaN if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids(run_dir: Path, own: int) -> dict[str, int]:
    """role -> pid: the launcher's pids.json, or the `asyncps train` process itself."""
    try:
        return {role: entry["pid"] for role, entry in json.loads((run_dir / "pids.json").read_text()).items()}
    except (OSError, ValueError):
        return {"train": own}


def asyncps(*args: str, run_dir: Path | None = None, kind: str = "", steps: int = 0) -> dict[str, float]:
    """Runs one asyncps command; with `run_dir`, also samples every process's CPU time when its
    metrics.jsonl shows step >= 10% and >= 90% of `steps` (rows of `kind`), and returns CPU ms
    per step by role over that window: the steady state, without start-up or final evaluation."""
    env = dict(os.environ)
    env.update(a[4:].split("=", 1) for a in args if a.startswith("env:"))
    args = tuple(a for a in args if not a.startswith("env:"))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "asyncps.cli", *args], stdout=subprocess.DEVNULL, stderr=err,
                                text=True, cwd=REPO, env=env)
        marks: list[tuple[int, dict[str, float]]] = []  # (step, cpu by role) at 10% and 90%
        while proc.poll() is None:
            time.sleep(0.05)
            if run_dir is None or len(marks) == 2:
                continue
            step = _last_step(run_dir / "metrics.jsonl", kind)
            if step >= (steps // 10 if not marks else steps * 9 // 10):
                marks.append((step, {role: _cpu_seconds(pid) for role, pid in _pids(run_dir, proc.pid).items()}))
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"asyncps {' '.join(args)} failed:\n{err.read()[-2000:]}")
    if len(marks) < 2:
        return {}
    (s0, c0), (s1, c1) = marks
    per_role = {role: 1e3 * (c1[role] - c0[role]) / (s1 - s0) for role in c0 if role in c1}
    out: dict[str, float] = {}
    for role, ms in per_role.items():
        out[role.rstrip("0123456789")] = out.get(role.rstrip("0123456789"), 0.0) + ms  # workers summed
    out["total"] = sum(per_role.values())
    return out


def _last_step(path: Path, kind: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if row.get("kind") == kind:
            return row["step"]
    return -1


ACCURACY: dict[str, list[float]] = {}  # setting -> final test accuracy of each run (report.json)


def _final_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "report.json").read_text()).get("final", {}).get("accuracy", float("nan"))


def single_process_rate(config: str, steps: int, run_dir: Path) -> float:
    cpu = asyncps("train", config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=0",
                  "train.log_every=20", run_dir=run_dir, kind="train", steps=steps)
    ACCURACY.setdefault("train", []).append(_final_accuracy(run_dir))
    CPU.setdefault("train", []).append(cpu)
    return json.loads((run_dir / "report.json").read_text())["throughput"]["steps_per_second"]


def cluster_rate(config: str, steps: int, workers: int, shards: int, run_dir: Path, overrides: tuple = ()) -> float:
    cpu = asyncps("launch", config, f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=0",
                  f"cluster.workers={workers}", f"cluster.ps={shards}", "train.log_every=20", *overrides,
                  run_dir=run_dir, kind="progress", steps=steps)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [r for r in rows if r["kind"] == "progress" and r["step"] >= steps // 10]
    first, last = progress[0], progress[-1]
    key = f"launch w={workers} ps={shards}" + (f" {' '.join(overrides)}" if overrides else "")
    ACCURACY.setdefault(key, []).append(_final_accuracy(run_dir))
    CPU.setdefault(key, []).append(cpu)
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
    print(f"\nsteady-state CPU ms per step by role (medians; workers summed; {os.cpu_count()} cores here)")
    roles = ["train", "worker", "ps", "chief", "total"]
    print(f"{'setting':<{width}} " + " ".join(f"{r:>8}" for r in roles) + f" {'cores x 1000 / total':>22}")
    for key, runs in CPU.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        med = {r: statistics.median(run.get(r, 0.0) for run in runs) for r in roles}
        print(f"{key:<{width}} " + " ".join(f"{med[r]:>8.2f}" for r in roles) +
              f" {(1 if key == 'train' else os.cpu_count()) * 1000 / med['total']:>22.0f}")
    print("per rep (steps/s): " + json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()}))
    print("per rep (CPU ms/step): " + json.dumps({k: [{r: round(v, 2) for r, v in run.items()} for run in runs]
                                                  for k, runs in CPU.items()}))
    print("per rep (accuracy): " + json.dumps(ACCURACY))


if __name__ == "__main__":
    main()
