"""Cluster throughput next to single-process training, side by side in one run.

    python bench/cluster.py [--steps 1500] [--reps 3] [--workers 2] [--shards 1] [--config configs/mnist_mlp.yaml]
                            [--transport grpc,shm] [--variant cluster.prefetch=true ...] [--eval-every N]
                            [--plot FILE.png]

`--transport grpc,shm` runs every launch once per transport (``cluster.transport=...``, in the
same interleaving): gRPC and the same-host shared-memory data plane side by side in one run.

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

Time to target: every run's report.json `target` section (the config's `train.target`, e.g.
accuracy 0.97 for configs/mnist_mlp.yaml) gives the global step and the seconds at which the
target was first reached, printed next to steps/s. The target is only checked at evaluations:
with the default `--eval-every 0` (no evaluation during the run, so the rates stay steady-state)
that is the final evaluation alone, so a reached target reads as the last step; pass
`--eval-every 100` (say) for a real time to target. `train` counts seconds from its first step
(data already loaded); `launch` from the chief's start, so its seconds include starting the
workers and shards and their data loading. `wall s` is the whole command, process start to exit
(start-up, data loading, the final evaluation). `--plot FILE.png` draws steps/s against workers, one
line per shard count, with the single-process rate as a horizontal line (needs matplotlib).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches' shared helpers
from procstat import cpu_seconds  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


CPU: dict[str, list[dict[str, float]]] = {}  # setting -> per run: CPU ms per step by role (steady state)
WALL: dict[str, list[float]] = {}  # setting -> wall seconds of each whole command (start-up, data, final evaluation)
_last_wall = 0.0


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
    for a in args:
        if a.startswith("env:"):
            name, value = a[4:].split("=", 1)
            env[name] = value
    args = tuple(a for a in args if not a.startswith("env:"))
    global _last_wall
    started = time.perf_counter()
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
                marks.append((step, {role: cpu_seconds(pid) for role, pid in _pids(run_dir, proc.pid).items()}))
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"asyncps {' '.join(args)} failed:\n{err.read()[-2000:]}")
    _last_wall = time.perf_counter() - started
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


TARGET: dict[str, list[dict]] = {}  # setting -> report.json `target` of each run ({metric, value, reached, step, seconds})


def _record_target(key: str, run_dir: Path) -> None:
    TARGET.setdefault(key, []).append(json.loads((run_dir / "report.json").read_text()).get("target", {}))


def _target_columns(key: str) -> tuple[str, str, str]:
    """(reached n/runs, median step, median seconds) over the runs that reached the target."""
    runs = TARGET.get(key, [])
    hit = [t for t in runs if t.get("reached")]
    if not runs or runs[0].get("value") is None:
        return "-", "-", "-"
    if not hit:
        return f"0/{len(runs)}", "-", "-"
    return (f"{len(hit)}/{len(runs)}", f"{statistics.median(t['step'] for t in hit):.0f}",
            f"{statistics.median(t['seconds'] for t in hit):.1f}")


def single_process_rate(config: str, steps: int, run_dir: Path, eval_every: int = 0) -> float:
    cpu = asyncps("train", config, f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={eval_every}",
                  "train.log_every=20", "train.target.stop=false", run_dir=run_dir, kind="train", steps=steps)
    ACCURACY.setdefault("train", []).append(_final_accuracy(run_dir))
    _record_target("train", run_dir)
    WALL.setdefault("train", []).append(_last_wall)
    CPU.setdefault("train", []).append(cpu)
    return json.loads((run_dir / "report.json").read_text())["throughput"]["steps_per_second"]


def cluster_rate(config: str, steps: int, workers: int, shards: int, run_dir: Path, overrides: tuple = (),
                 eval_every: int = 0) -> float:
    cpu = asyncps("launch", config, f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={eval_every}",
                  f"cluster.workers={workers}", f"cluster.ps={shards}", "train.log_every=20", "train.target.stop=false",
                  *overrides,
                  run_dir=run_dir, kind="progress", steps=steps)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [r for r in rows if r["kind"] == "progress" and r["step"] >= steps // 10]
    first, last = progress[0], progress[-1]
    key = f"launch w={workers} ps={shards}" + (f" {' '.join(overrides)}" if overrides else "")
    ACCURACY.setdefault(key, []).append(_final_accuracy(run_dir))
    _record_target(key, run_dir)
    WALL.setdefault(key, []).append(_last_wall)
    CPU.setdefault(key, []).append(cpu)
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_mlp.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--shards", default="1", help="comma-separated shard counts")
    parser.add_argument("--transport", default="",
                        help="comma-separated cluster.transport values (grpc, shm, auto): each launch once per "
                             "transport; empty: the config's")
    parser.add_argument("--variant", action="append", default=[], help="overrides for extra launches, e.g. cluster.prefetch=true")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="evaluate every N steps (the target is only checked at evaluations; 0: final only)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot steps/s against workers, one line per shard count and transport/variant")
    parser.add_argument("--json", metavar="FILE.json",
                        help="write every result so far to FILE.json after each run (a long sweep cut short keeps them)")
    args = parser.parse_args()
    shapes = [(int(w), int(s)) for s in args.shards.split(",") for w in args.workers.split(",")]
    rates: dict[str, list[float]] = {"train": []}
    transports = [f"cluster.transport={t}" for t in args.transport.split(",") if t] or [""]
    variants = [" ".join(x for x in (t, v) if x) for v in [""] + args.variant for t in transports]
    args.variants = variants
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            rates["train"].append(single_process_rate(args.config, args.steps, Path(tmp, f"train{rep}"),
                                                       args.eval_every))
            for v, variant in enumerate(variants):
                for w, s in shapes:
                    key = f"launch w={w} ps={s}" + (f" {variant}" if variant else "")
                    run_dir = Path(tmp, f"launch{rep}-{w}-{s}-{v}")
                    rates.setdefault(key, []).append(cluster_rate(args.config, args.steps, w, s, run_dir,
                                                                          tuple(variant.split()), args.eval_every))
                    if args.json:
                        _dump(args, rates)
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    base = statistics.median(rates["train"])
    target = next((t for runs in TARGET.values() for t in runs if t), {})
    print(f"\n{args.config}, {args.steps} steps, {args.reps} reps (medians, steps/s); target "
          f"{target.get('metric')} {target.get('value')}, checked "
          + (f"every {args.eval_every} steps" if args.eval_every else "at the final evaluation only"))
    width = max(22, *map(len, rates))
    print(f"{'setting':<{width}} {'steps/s':>9} {'vs train':>9} {'target':>7} {'at step':>8} {'at s':>7} {'wall s':>7} "
          f"{'accuracy (median, min-max)':>28}")
    for key, values in rates.items():
        med = statistics.median(values)
        acc = ACCURACY.get(key, [float("nan")])
        reached, step, secs = _target_columns(key)
        print(f"{key:<{width}} {med:>9.1f} {med / base:>9.2f} {reached:>7} {step:>8} {secs:>7} {statistics.median(WALL[key]):>7.1f} "
              f"{statistics.median(acc):>12.4f} ({min(acc):.4f}-{max(acc):.4f})")
    print(f"\nsteady-state CPU ms per step by role (medians; workers summed; {os.cpu_count()} cores here)")
    roles = ["train", "worker", "ps", "chief", "total"]
    print(f"{'setting':<{width}} " + " ".join(f"{r:>8}" for r in roles) + f" {'cores x 1000 / total':>22}")
    for key, runs in CPU.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        med_cpu = {r: statistics.median(run.get(r, 0.0) for run in runs) for r in roles}
        print(f"{key:<{width}} " + " ".join(f"{med_cpu[r]:>8.2f}" for r in roles) +
              f" {(1 if key == 'train' else os.cpu_count() or 1) * 1000 / med_cpu['total']:>22.0f}")
    print("per rep (steps/s): " + json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()}))
    print("per rep (CPU ms/step): " + json.dumps({k: [{r: round(v, 2) for r, v in run.items()} for run in runs]
                                                  for k, runs in CPU.items()}))
    print("per rep (accuracy): " + json.dumps(ACCURACY))
    print("per rep (wall s): " + json.dumps({k: [round(v, 1) for v in vs] for k, vs in WALL.items()}))
    print("per rep (target step, s): " + json.dumps({k: [[t.get("step"), None if t.get("seconds") is None else
                                                           round(t["seconds"], 1)] for t in ts] for k, ts in TARGET.items()}))
    if args.plot:
        _plot(args.plot, rates, base, args)


def _dump(args: argparse.Namespace, rates: dict[str, list[float]]) -> None:
    """Every result so far (per run, by setting) as JSON, replaced atomically."""
    out = {"config": args.config, "steps": args.steps, "eval_every": args.eval_every, "cores": os.cpu_count(),
           "steps_per_s": rates, "cpu_ms_per_step": CPU, "accuracy": ACCURACY, "wall_s": WALL, "target": TARGET}
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)


def _plot(path: str, rates: dict[str, list[float]], base: float, args: argparse.Namespace) -> None:
    """steps/s against workers, one line per shard count and variant (solid: the first variant,
    e.g. the first --transport), train as a horizontal line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (`pip install matplotlib` gives the plot)")
        return
    workers = [int(w) for w in args.workers.split(",")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, variant in enumerate(args.variants):
        for c, s in enumerate(int(s) for s in args.shards.split(",")):
            suffix = f" {variant}" if variant else ""
            ys = [statistics.median(rates[f"launch w={w} ps={s}{suffix}"]) for w in workers]
            ax.plot(workers, ys, marker="o", color=f"C{c}", linestyle=["-", "--", ":", "-."][v % 4],
                    label=f"launch, {s} shard{'s' if s > 1 else ''}" + (f", {variant.split('=')[-1]}" if variant else ""))
    ax.axhline(base, color="black", linestyle="--", label="train (single process)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlabel("workers")
    ax.set_ylabel("steps/s (steady state, median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{Path(args.config).name}, {args.steps} steps, {args.reps} rep(s), {os.cpu_count()} cores", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
