"""The event simulation against a real cluster: staleness histograms of the same delay model.

    python bench/sim_vs_launch.py [--config configs/linear_regression.yaml] [--workers 2]
                                  [--kind exponential] [--mean-ms 20] [--steps 600] [--seeds 0,1,2]
                                  [--mode async|ssp|sync|softsync] [--n N] [--out DIR]

`--mode` (with `--n` for softsync, `--bound` for ssp) runs the cluster in that `cluster.mode` and
the simulation in the same `staleness.simulate.mode`.

For each seed:

1. `asyncps launch CONFIG cluster.workers=M delay.kind=KIND delay.mean_ms=MS`: real workers,
   each sleeping a draw after every gradient (the worker's compute and the RPCs come on top);
   the shards measure the staleness of every applied push.
2. `asyncps train CONFIG staleness.simulate={workers: M, compute: {kind: KIND, mean_ms: MS}}`:
   the simulation with the same distribution, drawn from the same per-worker streams, and
   nothing else: a step takes exactly its delay.
3. The same simulation with a step of delay + o, o the cluster's measured overhead per step
   (M x run seconds / pushes - MS, i.e. what the real step adds to the delay on average; pushes
   per shard: with several shards the histogram counts every push once per shard):
   per-worker traces of o + draws of the distribution (`compute: {kind: trace}`).

Prints, per seed and pooled, the mean staleness of each and the total-variation distance
TV = 1/2 sum_k |P(k) - Q(k)| between the cluster's histogram and each simulation's.
Keep it small: a launch starts M + 2 processes (mostly asleep during the delays).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "asyncps.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"asyncps {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def histogram(run_dir: Path) -> tuple[dict[int, int], dict]:
    report = json.loads((run_dir / "report.json").read_text())
    return {int(k): v for k, v in report["staleness"]["histogram"].items()}, report


def tv(p: dict[int, int], q: dict[int, int]) -> float:
    n, m = sum(p.values()), sum(q.values())
    return 0.5 * sum(abs(p.get(k, 0) / n - q.get(k, 0) / m) for k in set(p) | set(q))


def mean(h: dict[int, int]) -> float:
    return sum(k * v for k, v in h.items()) / sum(h.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "linear_regression.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kind", default="exponential")
    ap.add_argument("--mean-ms", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mode", default="async", choices=["async", "ssp", "sync", "softsync"])
    ap.add_argument("--n", type=int, default=1, help="softsync: n (c = workers // n)")
    ap.add_argument("--bound", type=int, default=2, help="ssp: staleness bound")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sim_vs_launch-"))
    m, ms = args.workers, args.mean_ms
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", "telemetry.every_seconds=0"]
    cluster_mode = [f"cluster.mode={args.mode}", f"cluster.softsync_n={args.n}", f"cluster.staleness_bound={args.bound}"]
    sim_mode = f"mode: {args.mode}, n: {args.n}, staleness_bound: {args.bound}"
    pooled: dict[str, dict[int, int]] = {"launch": {}, "sim": {}, "sim+o": {}}  # staleness histograms
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        dist = f"{{kind: {args.kind}, mean_ms: {ms}}}"
        ldir, sdir, odir = out / f"launch{seed}", out / f"sim{seed}", out / f"simo{seed}"
        cli("launch", args.config, f"run_dir={ldir}", f"seed={seed}", f"cluster.workers={m}",
            f"delay.kind={args.kind}", f"delay.mean_ms={ms}", *cluster_mode, *common)
        hl, rl = histogram(ldir)
        cli("train", args.config, f"run_dir={sdir}", f"seed={seed}",
            f"staleness.simulate={{workers: {m}, {sim_mode}, compute: {dist}}}", *common)
        hs, _ = histogram(sdir)
        pushes = sum(hl.values()) // rl["config"]["cluster"]["ps"]  # each shard records every push
        overhead_ms = max(0.0, 1000.0 * m * rl["seconds"] / pushes - ms)
        rng = np.random.default_rng([seed, 0x0FF5E7])
        from asyncps.config import DelayConfig
        from asyncps.worker.distributions import Distribution
        d = Distribution(DelayConfig(kind=args.kind, mean_ms=ms))
        trace = out / f"trace{seed}.json"
        trace.write_text(json.dumps([[(overhead_ms + d.draw_ms(rng)) / 1000.0 for _ in range(args.steps * 2)]
                                     for _ in range(m)]))
        cli("train", args.config, f"run_dir={odir}", f"seed={seed}",
            f"staleness.simulate={{workers: {m}, {sim_mode}, compute: {{kind: trace, trace: {trace}}}}}", *common)
        ho, _ = histogram(odir)
        for name, h in (("launch", hl), ("sim", hs), ("sim+o", ho)):
            for k, v in h.items():
                pooled[name][k] = pooled[name].get(k, 0) + v
        rows.append((seed, pushes, overhead_ms, mean(hl), mean(hs), tv(hl, hs), mean(ho), tv(hl, ho)))
        print(f"seed {seed}: launch {pushes} pushes, overhead {overhead_ms:.1f} ms/step, mean staleness "
              f"launch {mean(hl):.3f} sim {mean(hs):.3f} (TV {tv(hl, hs):.3f}) sim+o {mean(ho):.3f} "
              f"(TV {tv(hl, ho):.3f})", flush=True)
    hl, hs, ho = pooled["launch"], pooled["sim"], pooled["sim+o"]
    print(f"pooled: mean staleness launch {mean(hl):.3f}, sim {mean(hs):.3f}, sim+o {mean(ho):.3f}; "
          f"TV(launch, sim) {tv(hl, hs):.3f}, TV(launch, sim+o) {tv(hl, ho):.3f}")
    for name, h in pooled.items():
        n = sum(h.values())
        print(f"  {name:7s} P(k), k = 0..5: " + " ".join(f"{h.get(k, 0) / n:.3f}" for k in range(6)))
    print(f"(runs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
