"""Consistent checkpoints of every shard: write, verify, find the latest, re-shard on restore.

Layout of a checkpoints folder (default RUN_DIR/checkpoints):

    checkpoint                          TF-style pointer: model_checkpoint_path: "ckpt-000001500"
    ckpt-000001500/
        shard-00000-of-00002.npz        values "value/<var>", optimizer slots "slot/<var>/<slot>"
        shard-00001-of-00002.npz        (npz, uncompressed, loadable with allow_pickle=False)
        manifest.json                   written LAST: step, per-shard versions and counters,
                                        placement, config, sha256 of every file, timestamp

Every file goes through `asyncps.atomic` (temp file, fsync, rename, fsync the folder), and the
manifest is written after the tensor files, so a folder with a valid manifest is complete. A
folder without one (a crash mid-write) is ignored and deleted by `cleanup`. A tensor file whose
sha256 differs from the manifest's (truncated, bit rot) makes its checkpoint invalid: the
loader says so and falls back to the previous valid checkpoint.

Restoring into a different number of shards joins the saved blocks with the saved placement and
splits them with the new one, slots included; see `Checkpoint.snapshots_for`.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncps.atomic import atomic_save_npz, atomic_write_bytes, atomic_write_json
from asyncps.errors import UserError
from asyncps.protos.codec import Snapshot
from asyncps.ps.partition import Placement

FORMAT = 1
MANIFEST = "manifest.json"
POINTER = "checkpoint"
_NAME = re.compile(r"^ckpt-(\d{9,})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, incomplete, corrupted, or for another model)."""


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:09d}"


def shard_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.npz"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Snapshot <-> npz arrays and manifest entries


def snapshot_arrays(snap: Snapshot) -> dict[str, np.ndarray]:
    """A shard snapshot's tensors, keyed "value/<var>" and "slot/<var>/<slot>"."""
    arrays = {f"value/{name}": v for name, v in snap.values.items()}
    arrays.update({f"slot/{name}/{slot}": a for name, slots in snap.slots.items() for slot, a in slots.items()})
    return arrays


def snapshot_entry(snap: Snapshot, file: str) -> dict:
    """The manifest's record of one shard: its file, version and counters."""
    return {"file": file, "version": snap.version, "optimizer": snap.optimizer, "updates": dict(snap.updates),
            "last_seq": {str(k): v for k, v in snap.last_seq.items()},
            "clocks": {str(k): v for k, v in snap.clocks.items()}}


def snapshot_from(entry: dict, arrays: dict[str, np.ndarray]) -> Snapshot:
    """The Snapshot saved as one manifest entry plus its npz arrays."""
    values, slots = {}, {}
    for key, array in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "value":
            values[rest] = array
        else:
            name, _, slot = rest.rpartition("/")
            slots.setdefault(name, {})[slot] = array
    return Snapshot(version=int(entry["version"]), values=values, slots=slots,
                    updates={k: int(v) for k, v in entry["updates"].items()},
                    last_seq={int(k): int(v) for k, v in entry["last_seq"].items()},
                    clocks={int(k): int(v) for k, v in entry["clocks"].items()}, optimizer=entry["optimizer"])


# ----------------------------------------------------------------------------------------------
# Writing


def write_checkpoint(folder: str | Path, snapshots: list[Snapshot], placement: Placement, config: dict,
                     extra: dict | None = None) -> Path:
    """Writes ckpt-<step>/ (tensor files, then manifest.json), then the pointer; returns the folder.

    The step is the global step of the snapshots (the smallest shard version).
    """
    folder = Path(folder)
    step = min(s.version for s in snapshots)
    path = folder / ckpt_name(step)
    if path.exists():  # the same step again (e.g. the final checkpoint): replace it whole
        shutil.rmtree(path)
    entries, files = [], {}
    for i, snap in enumerate(snapshots):
        name = shard_file(i, len(snapshots))
        atomic_save_npz(path / name, snapshot_arrays(snap))
        entries.append(snapshot_entry(snap, name))
        files[name] = {"sha256": sha256_of(path / name), "bytes": (path / name).stat().st_size}
    manifest = {"format": FORMAT, "step": step, "versions": [s.version for s in snapshots], "timestamp": time.time(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "placement": json.loads(placement.to_json()),
                "shards": entries, "files": files, "config": config, **(extra or {})}
    atomic_write_json(path / MANIFEST, manifest)
    write_pointer(folder)
    return path


def write_pointer(folder: Path) -> None:
    """The TF-style `checkpoint` file: the newest checkpoint first, then all of them."""
    names = [p.name for p in list_checkpoints(folder)]
    if not names:
        return
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    atomic_write_bytes(folder / POINTER, ("\n".join(lines) + "\n").encode())


def read_pointer(folder: Path) -> str | None:
    """The checkpoint the pointer file names (None without a readable pointer)."""
    try:
        first = (folder / POINTER).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    match = re.match(r'model_checkpoint_path:\s*"([^"]+)"', first)
    return match.group(1) if match else None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """ckpt-* folders holding a manifest.json, oldest first (contents not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def cleanup(folder: str | Path, keep: int) -> list[Path]:
    """Deletes incomplete ckpt-* folders (no manifest) and all but the newest `keep`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    incomplete = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and not (p / MANIFEST).is_file()]
    complete = list_checkpoints(folder)
    doomed = incomplete + complete[: max(0, len(complete) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    if doomed:
        write_pointer(folder)
    return doomed


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class Checkpoint:
    """A verified checkpoint folder (see `load`)."""

    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def versions(self) -> list[int]:
        return [int(v) for v in self.manifest["versions"]]

    @property
    def placement(self) -> Placement:
        return Placement.from_json(json.dumps(self.manifest["placement"]))

    def snapshots(self) -> list[Snapshot]:
        """The shards' snapshots exactly as saved (for the same placement)."""
        return [snapshot_from(e, self._arrays(e["file"])) for e in self.manifest["shards"]]

    def _arrays(self, file: str) -> dict[str, np.ndarray]:
        with np.load(self.path / file, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}

    def full_state(self) -> tuple[dict, dict, dict]:
        """(values, slots {var: {slot: array}}, updates {var: n}) of whole variables."""
        return join_snapshots(self.snapshots(), self.placement)

    def snapshots_for(self, placement: Placement) -> list[Snapshot]:
        """Snapshots for `placement`: as saved when it is the saved one, re-split otherwise."""
        saved = self.placement
        if placement == saved:
            return self.snapshots()
        _check_same_variables(saved, placement, self.path)
        return split_snapshots(self.snapshots(), saved, placement)


def load(path: str | Path) -> Checkpoint:
    """Reads and verifies one ckpt-* folder: manifest complete, every file's sha256 matching."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{path / MANIFEST}: not an asyncps checkpoint manifest (format {manifest.get('format')!r})")
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if sha256_of(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupted or truncated file)")
    return Checkpoint(path, manifest)


def latest_valid(folder: str | Path, warn=None) -> Checkpoint | None:
    """The newest checkpoint of `folder` that verifies; each refused one is reported to `warn`."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(folder)
    candidates = list(reversed(list_checkpoints(folder)))
    pointed = read_pointer(folder)
    if pointed and (folder / pointed) in candidates:  # the pointer's choice first, then by step
        candidates.remove(folder / pointed)
        candidates.insert(0, folder / pointed)
    for path in candidates:
        try:
            return load(path)
        except CheckpointError as exc:
            warn(f"checkpoint refused: {exc}; trying the previous one")
    return None


def resolve(spec: str | Path, default_folder: Path, warn=None) -> Checkpoint:
    """The checkpoint `spec` names: "latest" (in `default_folder`), a ckpt-* folder, a folder of
    checkpoints, or a run folder (its checkpoints/). Raises CheckpointError when none is valid."""
    folder = default_folder if str(spec) == "latest" else Path(spec)
    if (folder / MANIFEST).is_file():
        return load(folder)
    if not (folder / POINTER).exists() and (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    ckpt = latest_valid(folder, warn)
    if ckpt is None:
        raise CheckpointError(f"{folder}: no valid checkpoint found")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Re-sharding: join with the saved placement, split with the new one


def join_snapshots(snaps: list[Snapshot], placement: Placement) -> tuple[dict, dict, dict]:
    """Whole variables, slots and update counts from per-shard snapshots."""
    values = placement.join([s.values for s in snaps])
    slot_names = sorted({slot for s in snaps for slots in s.slots.values() for slot in slots})
    slots: dict[str, dict] = {}
    for slot in slot_names:
        pieces = [{n: sl[slot] for n, sl in s.slots.items() if slot in sl} for s in snaps]
        names = [n for n in placement.variables if any(n in p for p in pieces)]
        for name, array in placement.join(pieces, names).items():
            slots.setdefault(name, {})[slot] = array
    updates = {}
    for name, var in placement.variables.items():  # blocks of one variable normally agree; take the max
        updates[name] = max(snaps[b.shard].updates.get(name, 0) for b in var.blocks)
    return values, slots, updates


def split_snapshots(snaps: list[Snapshot], saved: Placement, placement: Placement) -> list[Snapshot]:
    """Per-shard snapshots of the same state for another placement.

    Values and slots are re-split exactly. Every new shard gets the global step (the smallest
    saved version) as its version, so the learning-rate schedule continues from it; a worker's
    last_seq and clock are the largest any saved shard had.
    """
    values, slots, updates = join_snapshots(snaps, saved)
    value_parts = placement.split(values)
    slot_parts = [dict() for _ in range(placement.num_shards)]
    for slot in sorted({k for sl in slots.values() for k in sl}):
        for shard, part in enumerate(placement.split({n: sl[slot] for n, sl in slots.items() if slot in sl})):
            for name, array in part.items():
                slot_parts[shard].setdefault(name, {})[slot] = np.ascontiguousarray(array)
    version = min(s.version for s in snaps)
    last_seq, clocks = _max_per_worker(s.last_seq for s in snaps), _max_per_worker(s.clocks for s in snaps)
    return [Snapshot(version=version, values={n: np.ascontiguousarray(v) for n, v in value_parts[i].items()},
                     slots=slot_parts[i], updates={n: updates[n] for n in value_parts[i]},
                     last_seq=dict(last_seq), clocks=dict(clocks), optimizer=snaps[0].optimizer)
            for i in range(placement.num_shards)]


def _max_per_worker(tables) -> dict[int, int]:
    out: dict[int, int] = {}
    for table in tables:
        for worker, n in table.items():
            out[worker] = max(out.get(worker, n), n)
    return out


def _check_same_variables(saved: Placement, placement: Placement, where: Path) -> None:
    mine = {n: (v.shape, v.dtype) for n, v in placement.variables.items()}
    theirs = {n: (v.shape, v.dtype) for n, v in saved.variables.items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise CheckpointError(f"{where}: the checkpoint's variables differ from the model's (first differences: {diff})")
