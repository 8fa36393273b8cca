"""`asyncps inspect CKPT [--json]`: what a checkpoint holds, without starting anything.

CKPT is a ckpt-* folder, a folder of checkpoints or a run directory (its latest valid
checkpoint). Prints the step, per-shard versions, the placement, and every variable with its
shape, dtype and L2 norm, and its optimizer slots with theirs. The checksums are verified first.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a ckpt-* folder, a checkpoints folder or a run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    summary = describe(open_checkpoint(args.checkpoint))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    return 0


def open_checkpoint(spec: str):
    """The verified checkpoint that `spec` names (refused ones are reported on stderr)."""
    from pathlib import Path

    from asyncps.chief import checkpoint as ckpt

    return ckpt.resolve(spec, Path(spec), warn=lambda m: print(f"asyncps: {m}", file=sys.stderr))


def describe(checkpoint) -> dict:
    values, slots, updates = checkpoint.full_state()
    m = checkpoint.manifest
    placement = checkpoint.placement
    return {
        "path": str(checkpoint.path), "step": checkpoint.step, "versions": checkpoint.versions,
        "time": m.get("time"), "seconds": m.get("seconds"), "pause_ms": m.get("pause_ms"),
        "shards": placement.num_shards, "optimizer": m["shards"][0]["optimizer"],
        "files": {name: f["bytes"] for name, f in m["files"].items()},
        "variables": {
            name: {"shape": list(v.shape), "dtype": v.dtype.name, "norm": _norm(v), "updates": updates[name],
                   "shards": [b.shard for b in placement.variables[name].blocks],
                   "slots": {s: {"norm": _norm(a)} for s, a in sorted(slots.get(name, {}).items())}}
            for name, v in sorted(values.items())
        },
    }


def _norm(array) -> float:
    return float(np.linalg.norm(np.asarray(array, dtype=np.float64).ravel()))


def print_table(s: dict) -> None:
    print(f"{s['path']}\n  step {s['step']}  versions {s['versions']}  shards {s['shards']}  "
          f"optimizer {s['optimizer'] or '-'}  taken {s['time']}")
    print(f"  {'variable':<28} {'shape':<14} {'dtype':<8} {'norm':>12} {'updates':>8}  shards  slots (norm)")
    for name, v in s["variables"].items():
        slots = ", ".join(f"{k}={x['norm']:.4g}" for k, x in v["slots"].items()) or "-"
        print(f"  {name:<28} {'x'.join(map(str, v['shape'])) or 'scalar':<14} {v['dtype']:<8} {v['norm']:>12.6g} "
              f"{v['updates']:>8}  {','.join(map(str, v['shards'])):<6}  {slots}")
