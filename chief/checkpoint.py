"""Consistent checkpoints of every shard: write, verify, find the latest, re-shard on restore.

Layout of a checkpoints folder (default RUN_DIR/checkpoints):

    checkpoint                          TF-style pointer: model_checkpoint_path: "ckpt-000001500"
    ckpt-000001500/
        shard-00000-of-00002.npz        values "value/<var>", optimizer slots "slot/<var>/<slot>"
        shard-00001-of-00002.npz        (npz, uncompressed, loadable with allow_pickle=False)
        manifest.json                   written LAST: step, per-shard versions and counters,
                                        placement, config, sha256 of every file, timestamp, and
                                        `manifest_sha256`: the sha256 of its own canonical content

A checkpoint is written into a hidden `.ckpt-<step>.tmp-<pid>/` folder (every file through
`asyncps.atomic`: temp file, fsync, rename, fsync the folder; the manifest after the tensor
files), which is then renamed to `ckpt-<step>/`: a `ckpt-*` folder is complete or absent, and a
failed write (ENOSPC, EACCES) leaves every earlier checkpoint as it was, including one of the
same step being replaced. Leftovers of a crash mid-write are deleted by `cleanup`.

Loading verifies the manifest (its own sha256, then its schema: types, step = the folder's step
= min(versions), one shard entry and one file per shard) and every file's sha256. Anything that
does not verify makes the checkpoint invalid: `latest_valid` says so in one line and falls back
to the previous one, newest step first. The `checkpoint` pointer file is only a hint for other
tools; it never decides which checkpoint is used.

Restoring into a different number of shards joins the saved blocks with the saved placement and
splits them with the new one, slots included; see `Checkpoint.snapshots_for`.

Id-keyed tables (docs/sparse.md) are saved beside the shard files, in chunks of at most
TABLE_CHUNK_ROWS rows (and about TABLE_CHUNK_BYTES), so neither the chief nor a shard ever holds a whole table:

        table-00-s00000-c000000.npz     "ids", "versions", "values", "slot/<slot>" of one chunk
                                        of table 0's rows on shard 0 (the manifest's `tables`
                                        names each table, its dim, and per saved shard its
                                        update count, rows and chunk files)

They are streamed from the paused shards (SnapshotTable) into a hidden staging folder while the
shards are paused (the pause grows with the tables' rows: measured in bench/sparse.py), then
moved into the checkpoint's folder with the rest and verified like every file (sha256 in
`files`). A restore reads them one chunk at a time and sends each shard the rows it owns by
hash (`partition.table_owners`), whatever the saved shard count (`table_chunks_for`).
"""
from __future__ import annotations

import logging
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncps.atomic import atomic_save_npz, atomic_write_bytes, atomic_write_json, fsync_dir, jsonable
from asyncps.errors import UserError
from asyncps.shard_types import Snapshot
from asyncps.partition import Placement

logger = logging.getLogger(__name__)
FORMAT = 2  # 2: the manifest carries MANIFEST_DIGEST; 1 (still read): without it
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest names files and counters: far below this
MANIFEST_DIGEST = "manifest_sha256"
POINTER = "checkpoint"
_NAME = re.compile(r"^ckpt-(\d{9,})$")
_LEFTOVER = re.compile(r"^\.ckpt-(\d{9,})\.(tmp|old|tables)-\d+$")  # a write in progress, or a crash's leftover
_TABLE_FILE = re.compile(r"^table-\d{2}-s\d{5}-c\d{6}\.npz$")
TABLE_CHUNK_ROWS = 65536
TABLE_CHUNK_BYTES = 8 << 20  # a chunk's rows with up to 3 slots stay far below a server's 64 MiB message limit


def table_chunk_rows(dim: int) -> int:
    """Rows per saved chunk of a table of width `dim`: TABLE_CHUNK_ROWS, fewer for wide rows."""
    return max(1, min(TABLE_CHUNK_ROWS, TABLE_CHUNK_BYTES // (dim * 4 * 4 + 16)))
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    values: dict[str, np.ndarray] = {}
    slots: dict[str, dict[str, np.ndarray]] = {}
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


def table_staging(folder: str | Path, step: int) -> Path:
    """The hidden folder table chunks are streamed into before `write_checkpoint` moves them."""
    return Path(folder) / f".{ckpt_name(step)}.tables-{os.getpid()}"


def table_file(table: int, shard: int, chunk: int) -> str:
    return f"table-{table:02d}-s{shard:05d}-c{chunk:06d}.npz"


def write_table(staging: Path, k: int, name: str, dim: int, parts) -> dict:
    """Writes table `name` (index k) into `staging`, chunk by chunk: `parts` yields per saved
    shard (shard, updates, chunks); returns its manifest entry (files listed per part)."""
    staging.mkdir(parents=True, exist_ok=True)
    entry: dict = {"name": name, "dim": int(dim), "parts": []}
    for shard, updates, chunks in parts:
        files, rows = [], 0
        for c, chunk in enumerate(chunks):
            arrays = {"ids": chunk["ids"], "versions": chunk["versions"], "values": chunk["values"],
                      **{f"slot/{slot}": v for slot, v in chunk["slots"].items()}}
            atomic_save_npz(staging / table_file(k, shard, c), arrays)
            files.append(table_file(k, shard, c))
            rows += len(chunk["ids"])
        entry["parts"].append({"shard": shard, "updates": int(updates), "rows": rows, "files": files})
    return entry


def write_checkpoint(folder: str | Path, snapshots: list[Snapshot], placement: Placement, config: dict,
                     extra: dict | None = None, tables: tuple[Path, list] | None = None) -> Path:
    """Writes ckpt-<step>/ (tensor files, then manifest.json), then the pointer; returns the folder.

    The step is the global step of the snapshots (the smallest shard version). The files go to a
    hidden temp folder renamed to ckpt-<step>/ once complete. A failure (OSError: ENOSPC, EACCES, ...) removes what was written and leaves every existing
    checkpoint as it was, one of the same step included (it is replaced only by a complete one).
    """
    folder = Path(folder)
    step = min(s.version for s in snapshots)
    path = folder / ckpt_name(step)
    tmp, old = folder / f".{path.name}.tmp-{os.getpid()}", folder / f".{path.name}.old-{os.getpid()}"
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        entries, files = [], {}
        for i, snap in enumerate(snapshots):
            name = shard_file(i, len(snapshots))
            atomic_save_npz(tmp / name, snapshot_arrays(snap))
            entries.append(snapshot_entry(snap, name))
            files[name] = {"sha256": sha256_of(tmp / name), "bytes": (tmp / name).stat().st_size}
        table_entries = _move_tables(tables, tmp, files) if tables is not None else None
        manifest = {"format": FORMAT, "step": step, "versions": [s.version for s in snapshots], "timestamp": time.time(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "placement": json.loads(placement.to_json()),
                    "shards": entries, "files": files, "config": config, **(extra or {}),
                    **({"tables": table_entries} if table_entries else {})}
        atomic_write_json(tmp / MANIFEST, seal_manifest(manifest))
        if path.exists():  # the same step again (e.g. the final checkpoint): replaced once complete
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if old.exists():
                os.rename(old, path)
            raise
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if tables is not None:
            shutil.rmtree(tables[0], ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    try:
        write_pointer(folder)
    except OSError:
        pass  # the pointer is a hint for other tools: loading goes by step (latest_valid)
    return path


def _move_tables(tables: tuple[Path, list], tmp: Path, files: dict) -> list:
    """Moves the staged table chunks into the checkpoint's temp folder; their `files` entries."""
    staging, entries = tables
    for entry in entries:
        for part in entry["parts"]:
            for name in part["files"]:
                files[name] = {"sha256": sha256_of(staging / name), "bytes": (staging / name).stat().st_size}
                os.rename(staging / name, tmp / name)
    shutil.rmtree(staging, ignore_errors=True)
    return entries


def canonical_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its digest (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest as JSON will read it back, with its MANIFEST_DIGEST."""
    plain = json.loads(json.dumps(manifest, default=jsonable))
    return {**plain, MANIFEST_DIGEST: canonical_digest(plain)}


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


def step_of(path: Path) -> int:
    """The step a ckpt-* folder's name says; ValueError for a name that is not ckpt-<step>."""
    named = _NAME.match(Path(path).name)
    if named is None:
        raise ValueError(f"{path}: not a checkpoint folder name (ckpt-<step>)")
    return int(named.group(1))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """ckpt-* folders holding a manifest.json, oldest first (contents not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def recover_interrupted(folder: Path) -> list[Path]:
    """A crash while a checkpoint of the same step was being replaced (between its two renames)
    leaves no ckpt-<step>, a complete `.tmp` (manifest written last) and the `.old` one: the
    newest complete one is put back in place before leftovers are cleaned; returns what was."""
    restored = []
    leftovers: dict[int, dict[str, Path]] = {}
    for p in folder.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            leftovers.setdefault(int(m.group(1)), {})[m.group(2)] = p
    for step, kinds in sorted(leftovers.items()):
        final = folder / ckpt_name(step)
        if final.exists():
            continue
        os.rename(kinds.get("tmp") or kinds["old"], final)  # the new one if complete, else the one it replaced
        restored.append(final)
    return restored


def cleanup(folder: str | Path, keep: int) -> list[Path]:
    """Deletes incomplete ckpt-* folders (no manifest), leftovers of a write that crashed, and all
    but the newest `keep`; returns them. Best effort: what cannot be deleted stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    recover_interrupted(folder)
    incomplete = [p for p in folder.iterdir() if p.is_dir() and (_LEFTOVER.match(p.name) or
                                                                 (_NAME.match(p.name) and not (p / MANIFEST).is_file()))]
    complete = list_checkpoints(folder)
    doomed = incomplete + complete[: max(0, len(complete) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    if doomed:
        try:
            write_pointer(folder)
        except OSError:
            pass  # a hint only
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

    @property
    def tables(self) -> list[dict]:
        """The manifest's id-keyed tables: [{"name", "dim", "parts": [{"shard", "updates", "rows",
        "files"}]}] ([] for a dense model)."""
        return list(self.manifest.get("tables") or [])

    def table_chunks_for(self, table: dict, shard: int, num_shards: int):
        """The saved rows of `table` that `shard` of `num_shards` owns by hash, chunk by chunk
        (one file in memory at a time), whatever shard count they were saved from."""
        from asyncps.partition import table_owners

        for part in table["parts"]:
            for file in part["files"]:
                with np.load(self.path / file, allow_pickle=False) as z:
                    ids = z["ids"]
                    mine = table_owners(ids, num_shards) == shard
                    if not mine.any():
                        continue
                    yield {"ids": ids[mine], "versions": z["versions"][mine], "values": z["values"][mine],
                           "slots": {k[5:]: z[k][mine] for k in z.files if k.startswith("slot/")}}

    def snapshots_for(self, placement: Placement) -> list[Snapshot]:
        """Snapshots for `placement`: as saved when it is the saved one, re-split otherwise."""
        saved = self.placement
        if placement == saved:
            return self.snapshots()
        _check_same_variables(saved, placement, self.path)
        return split_snapshots(self.snapshots(), saved, placement)


def load(path: str | Path) -> Checkpoint:
    """Reads and verifies one ckpt-* folder: the manifest (its own sha256, its schema), then every
    file's sha256. Raises CheckpointError (one line) for anything that does not verify."""
    path = Path(path)
    try:
        with (path / MANIFEST).open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)") from None
    except (OSError, ValueError, RecursionError, MemoryError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path / MANIFEST}: damaged manifest (unreadable: {_short(exc)})") from None
    problem = manifest_problem(manifest, path)
    if problem:
        raise CheckpointError(f"{path / MANIFEST}: damaged manifest ({problem})")
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if sha256_of(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupted or truncated file)")
    return Checkpoint(path, manifest)


def _short(value, limit: int = 120) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _int_table(table, low: int) -> bool:
    """{"<worker>": n} with worker >= 0 and n >= low."""
    return isinstance(table, dict) and all(isinstance(k, str) and k.isdigit() and _is_int(v, low) for k, v in table.items())


def manifest_problem(m, path: Path | None = None) -> str | None:
    """What is wrong with a parsed manifest (its digest, then its schema), or None."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if MANIFEST_DIGEST in m:
        if m[MANIFEST_DIGEST] != canonical_digest(m):
            return f"{MANIFEST_DIGEST} does not match its content"
    elif m.get("format") != 1:
        return f"no {MANIFEST_DIGEST}"  # only format 1 manifests were written without it
    if not _is_int(m.get("format")) or m["format"] not in (1, FORMAT):
        return f"format {_short(m.get('format'))!r}, expected 1 or {FORMAT}"
    step, versions, shards, files = m.get("step"), m.get("versions"), m.get("shards"), m.get("files")
    if not _is_int(step):
        return f"step {_short(step)!r} is not an integer >= 0"
    named = _NAME.match(path.name) if path is not None else None
    if named and int(named.group(1)) != step:
        return f"step {step} in folder {named.group(0)}"
    if not (isinstance(versions, list) and versions and all(_is_int(v) for v in versions)):
        return "versions is not a list of integers >= 0"
    if step != min(versions):
        return f"step {step} is not min(versions) {min(versions)}"
    if not (isinstance(shards, list) and len(shards) == len(versions)):
        return f"shards is not a list of {len(versions)} entries"
    if not isinstance(files, dict):
        return "files is not an object"
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{i}] is not an object"
        if entry.get("file") != shard_file(i, len(shards)):
            return f"shards[{i}].file {_short(entry.get('file'))!r}, expected {shard_file(i, len(shards))!r}"
        if entry.get("version") != versions[i] or not _is_int(entry.get("version")):
            return f"shards[{i}].version {_short(entry.get('version'))!r} differs from versions[{i}] {versions[i]}"
        if not isinstance(entry.get("optimizer"), str):
            return f"shards[{i}].optimizer is not a string"
        updates = entry.get("updates")
        if not (isinstance(updates, dict) and all(isinstance(k, str) and _is_int(v) for k, v in updates.items())):
            return f"shards[{i}].updates is not a table of counts"
        if not (_int_table(entry.get("last_seq"), -1) and _int_table(entry.get("clocks"), 0)):
            return f"shards[{i}].last_seq or clocks is not a table of worker counters"
        meta = files.get(entry["file"])
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])
                and _is_int(meta.get("bytes"))):
            return f"files[{entry['file']!r}] has no sha256 and size"
    problem, table_files = _tables_problem(m.get("tables", []), files)
    if problem:
        return problem
    if set(files) != {e["file"] for e in shards} | table_files:
        return f"files {_short(sorted(files))} are not the shards' and tables' files"
    if not isinstance(m.get("config"), dict):
        return "config is not an object"
    if "seconds" in m and not (isinstance(m["seconds"], (int, float)) and not isinstance(m["seconds"], bool)):
        return "seconds is not a number"
    try:
        placement = Placement.from_json(json.dumps(m.get("placement")))
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a damaged placement
        return f"placement unreadable ({type(exc).__name__}: {_short(exc)})"
    if placement.num_shards != len(shards):
        return f"placement for {placement.num_shards} shards, {len(shards)} saved"
    return None


def _tables_problem(tables, files: dict) -> tuple[str | None, set]:
    """(what is wrong with the manifest's `tables`, or None; the table files it names)."""
    named: set = set()
    if not isinstance(tables, list):
        return "tables is not a list", named
    for k, t in enumerate(tables):
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and _is_int(t.get("dim"), 1)
                and isinstance(t.get("parts"), list)):
            return f"tables[{k}] has no name, dim >= 1 and parts", named
        for part in t["parts"]:
            if not (isinstance(part, dict) and _is_int(part.get("shard")) and _is_int(part.get("updates"))
                    and _is_int(part.get("rows")) and isinstance(part.get("files"), list)):
                return f"tables[{k}] has a part without shard, updates, rows and files", named
            for name in part["files"]:
                meta = files.get(name)
                if not (isinstance(name, str) and _TABLE_FILE.match(name) and isinstance(meta, dict)
                        and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])):
                    return f"tables[{k}] names file {_short(name)!r} without a sha256 in files", named
                named.add(name)
    return None, named


def latest_valid(folder: str | Path, warn=None) -> Checkpoint | None:
    """The newest checkpoint of `folder` that verifies, by step (the pointer file is not
    consulted: a crash between a manifest and the pointer leaves it stale); each refused one is
    reported to `warn` in one line."""
    warn = warn or logger.warning
    folder = Path(folder)
    if folder.is_dir():
        try:
            for path in recover_interrupted(folder):
                warn(f"{path.name}: put back in place (a crash interrupted its replacement)")
        except OSError as exc:  # a read-only folder: read what is there
            warn(f"{folder}: could not repair an interrupted checkpoint ({exc.strerror})")
    candidates = list(reversed(list_checkpoints(folder)))
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
    if not list_checkpoints(folder) and (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    ckpt = latest_valid(folder, warn)
    if ckpt is None:
        raise CheckpointError(f"{folder}: no valid checkpoint found")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Resuming with a config: what must match the checkpoint's

# Keys whose change a checkpoint cannot follow: they define the variables (names, shapes), the
# optimizer slots saved with them, or what the shards' saved counters mean. Every other key may
# change on resume (docs/failures.md lists both); the number of shards may change too (the
# checkpoint is re-split), and the variables' shapes are checked again when the chief restores.
MUST_MATCH = ("model.name", "model.hidden", "model.context", "model.embed_dim", "data.name",
              "optimizer.name", "optimizer.staleness_policy.name", "train.frozen", "cluster.mode")


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def config_mismatches(manifest: dict, config: dict) -> list[str]:
    """`key saved -> new` for each key of `config` (a Config.to_dict()) that cannot continue the
    checkpoint whose manifest is `manifest`; empty when it can. Keys the saved config lacks (an
    older version) are not compared."""
    saved_config = manifest.get("config")
    saved: dict = saved_config if isinstance(saved_config, dict) else {}
    plain = json.loads(json.dumps(config, default=jsonable))
    out = []
    for key in MUST_MATCH:
        old, new = _lookup(saved, key), _lookup(plain, key)
        if old is not _MISSING and new is not _MISSING and old != new:
            out.append(f"{key} {old!r} -> {new!r}")
    model = _lookup(plain, "model.name")
    if isinstance(model, str) and ":" in model and isinstance(saved.get("model"), dict):
        # a user's model (module:attr): its options shape its variables, so all of them must match
        old_model, new_model = saved["model"], plain.get("model", {})
        for key in sorted(set(old_model) | set(new_model)):
            if key != "name" and old_model.get(key, _MISSING) != new_model.get(key, _MISSING):
                out.append(f"model.{key} {old_model.get(key, '(unset)')!r} -> {new_model.get(key, '(unset)')!r} "
                           f"(an option of the user model {model})")
    name = _lookup(plain, "optimizer.name")
    names = {e["optimizer"] for e in manifest.get("shards", [])
             if isinstance(e, dict) and isinstance(e.get("optimizer"), str) and e["optimizer"]}
    if names and names != {name} and not any(k.startswith("optimizer.name ") for k in out):
        out.append(f"optimizer.name {sorted(names)[0]!r} (the shards' slots) -> {name!r}")
    if name == "rmsprop" and _lookup(saved, "optimizer.name") == "rmsprop":  # momentum 0: no `mom` slot
        old, new = _lookup(saved, "optimizer.rmsprop_momentum"), _lookup(plain, "optimizer.rmsprop_momentum")
        if old is not _MISSING and new is not _MISSING and bool(old) != bool(new):
            out.append(f"optimizer.rmsprop_momentum {old!r} -> {new!r} (adds or removes the 'mom' slot)")
    workers = [int(w) for e in manifest.get("shards", []) if isinstance(e, dict)
               for table in (e.get("last_seq", {}), e.get("clocks", {})) for w in table]
    new_workers = _lookup(plain, "cluster.workers")
    if workers and isinstance(new_workers, int) and max(workers) >= new_workers:
        old = _lookup(saved, "cluster.workers")
        out.append(f"cluster.workers {max(workers) + 1 if old is _MISSING else old!r} -> {new_workers!r} (the "
                   f"checkpoint holds counters of worker {max(workers)}: more workers are fine, fewer are not)")
    return out


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
    slot_parts: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in range(placement.num_shards)]
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
