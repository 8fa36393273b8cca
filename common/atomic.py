"""Durable file writes: temp file in the same folder, fsync, os.replace, fsync the folder.

Every file that another process or a later run relies on (reports, manifests, checkpoints, the
data cache) goes through here, so a crash leaves either the old file or the new one, never half.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temp file beside `path` (what it returns is ignored), then atomically put it
    in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide shared files (data cache, runs) from others
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_save_npz(path: str | Path, arrays: Mapping[str, Any]) -> Path:
    """Write name-keyed arrays as an uncompressed .npz (readable with allow_pickle=False), each
    array's data 64-byte aligned so that it can be mapped (`asyncps.aligned_npz`)."""
    from asyncps.aligned_npz import write_aligned_npz  # numpy: not before the CLI pins BLAS threads

    return atomic_write(path, lambda f: write_aligned_npz(f, arrays))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(value: Any) -> Any:
    """numpy scalars and arrays inside reports become plain JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
