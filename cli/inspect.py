"""`asyncps inspect CKPT [--json]`: what a checkpoint holds, without starting anything.

CKPT is a ckpt-* folder, a folder of checkpoints or a run directory (its latest valid
checkpoint). Prints the step, per-shard versions, the placement, and every variable with its
shape, dtype and L2 norm, and its optimizer slots with theirs. The checksums are verified first.
Id-keyed tables (docs/sparse.md): rows (per saved shard), the memory their values and slots take
and the bytes on disk, and the hottest ids (most updated rows), read one chunk at a time.
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
        **({"tables": {t["name"]: describe_table(checkpoint, t) for t in checkpoint.tables}} if checkpoint.tables else {}),
    }


def describe_table(checkpoint, table: dict, top: int = 10) -> dict:
    """Rows, memory and the `top` hottest ids of one saved table (one chunk in memory at a time)."""
    files = checkpoint.manifest["files"]
    hot_ids, hot_updates = np.zeros(0, np.int64), np.zeros(0, np.int64)
    slots = 0
    for part in table["parts"]:
        for file in part["files"]:
            with np.load(checkpoint.path / file, allow_pickle=False) as z:
                slots = sum(k.startswith("slot/") for k in z.files)
                ids, versions = np.concatenate([hot_ids, z["ids"]]), np.concatenate([hot_updates, z["versions"]])
            keep = np.lexsort((ids, -versions))[:top]
            hot_ids, hot_updates = ids[keep], versions[keep]
    rows = sum(p["rows"] for p in table["parts"])
    return {"dim": table["dim"], "rows": rows, "rows_per_shard": {str(p["shard"]): p["rows"] for p in table["parts"]},
            "memory_bytes": rows * (table["dim"] * 4 * (1 + slots) + 8 + 8),  # values, slots, id, version
            "file_bytes": sum(files[f]["bytes"] for p in table["parts"] for f in p["files"]),
            "updates": max((p["updates"] for p in table["parts"]), default=0),
            "hottest": [{"id": int(i), "updates": int(u)} for i, u in zip(hot_ids, hot_updates)]}


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
    for name, t in (s.get("tables") or {}).items():
        per_shard = ", ".join(f"{k}: {n}" for k, n in t["rows_per_shard"].items())
        print(f"  table {name}: dim {t['dim']}, {t['rows']} rows ({per_shard}), {t['memory_bytes'] / 2**20:.1f} MiB in "
              f"memory with slots, {t['file_bytes'] / 2**20:.1f} MiB on disk")
        print("    hottest ids: " + ", ".join(f"{h['id']} ({h['updates']})" for h in t["hottest"]))
