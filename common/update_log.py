"""The update log of a cluster run: what `asyncps replay` needs to recompute it bit for bit.

Two kinds of files, all under ``RUN_DIR/replay/`` (LOG_DIR):

- ``ps{i}.log``, one per shard: every state change of the shard, in the order it happened under
  the shard's lock: each push that changed something (APPLIED, ACCUMULATED, DROPPED: worker,
  seq, read version, the version after it, whether the shard held what the worker read at that
  version, for delay compensation), each (re-)registration or retirement of a worker, and each
  restore from a checkpoint (which `asyncps replay` refuses). Duplicates and rejected pushes
  change nothing and are not logged.
- ``worker{w}.{pid}.log``, one per worker process: for each gradient, before it is computed, its
  seq, the batch number of the worker's BatchStream, the state of the worker's random generator
  (dropout) and the version it read from every shard.

Format: one JSON header line (``format``, the record ``fields`` as a numpy dtype description,
and who wrote the file), then fixed-size little-endian records, so a writer packs ~40 bytes per
event into a buffered file (no syscall per push) and a reader maps the rest with
``np.frombuffer``. A shard's buffer is flushed every FLUSH_SECONDS and at close (a shard killed
hard loses its state anyway: the run is restored from a checkpoint, which replay refuses; a log
cut short is detected); a worker's is flushed at every record, so a killed worker loses nothing.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT = "asyncps-update-log/1"
LOG_DIR = "replay"
FLUSH_SECONDS = 1.0

# Shard events (`kind`) and push outcomes (`result`, as in PushReply.Result).
PUSH, REGISTER, RETIRE, RESTORE = 0, 1, 2, 3
RESULTS = {"APPLIED": 1, "ACCUMULATED": 2, "DROPPED": 3}
RESULT_NAMES = {code: name for name, code in RESULTS.items()}

SHARD_FIELDS = [("kind", "u1"), ("result", "u1"), ("had_read", "u1"), ("pad", "u1"), ("worker", "<i4"),
                ("seq", "<i8"), ("read_version", "<i8"), ("version", "<i8")]
_SHARD_STRUCT = struct.Struct("<BBBxiqqq")


def worker_fields(num_shards: int) -> list[tuple]:
    """Record layout of a worker log: seq, batch number, PCG64 state (128-bit state and inc as
    two words each, has_uint32, uinteger) and the version read from each shard."""
    return [("seq", "<i8"), ("batch", "<i8"), ("state", "<u8", (2,)), ("inc", "<u8", (2,)),
            ("uinteger", "<u4"), ("has_uint32", "u1"), ("pad", "u1", (3,)), ("versions", "<i8", (num_shards,))]


def _dtype(fields) -> np.dtype:
    return np.dtype([tuple(f) for f in fields])


class _Writer:
    """A header line, then records appended to a buffered file; thread-safe, flushed now and then."""

    def __init__(self, path: Path, header: dict, flush_each: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self._flush_each = path, flush_each
        self._file = path.open("wb", buffering=1 << 16)
        self._file.write(json.dumps({"format": FORMAT, **header}).encode() + b"\n")
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def _write(self, record: bytes) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.write(record)
            if self._flush_each or time.monotonic() - self._flushed > FLUSH_SECONDS:
                self._file.flush()
                self._flushed = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


class ShardLog(_Writer):
    """The writer of one shard's log (called by `Shard` under its lock, so in the shard's order)."""

    def __init__(self, path: Path, index: int, mode: str):
        super().__init__(Path(path), {"role": "ps", "index": index, "mode": mode, "fields": SHARD_FIELDS})

    def push(self, worker: int, seq: int, read_version: int, result: str, version: int, had_read: bool) -> None:
        """A push that changed the shard (not a duplicate); `version`: the shard's after it."""
        self._write(_SHARD_STRUCT.pack(PUSH, RESULTS[result], had_read, worker, seq, read_version, version))

    def register(self, worker: int, retire: bool, version: int) -> None:
        self._write(_SHARD_STRUCT.pack(RETIRE if retire else REGISTER, 0, 0, worker, -1, -1, version))

    def restore(self, version: int) -> None:
        self._write(_SHARD_STRUCT.pack(RESTORE, 0, 0, -1, -1, -1, version))


class WorkerLog(_Writer):
    """The writer of one worker process's step log, flushed at every record (one write per step,
    a few microseconds against milliseconds of gradient): a worker killed with SIGKILL may have
    pushed its last gradient to some shards, and replay needs that gradient's record."""

    def __init__(self, path: Path, worker: int, data_shard: int, num_data_shards: int, seed: int, num_shards: int):
        header = {"role": "worker", "worker": worker, "data_shard": data_shard, "num_data_shards": num_data_shards,
                  "seed": seed, "num_shards": num_shards, "pid": os.getpid(), "started": time.time(),
                  "fields": worker_fields(num_shards)}
        super().__init__(Path(path), header, flush_each=True)
        self._struct = struct.Struct("<qqQQQQIB3x" + "q" * num_shards)

    def step(self, seq: int, batch: int, rng: np.random.Generator, versions) -> None:
        """Called before the gradient is computed, with the versions of the weights it uses."""
        s = rng.bit_generator.state
        state, inc = s["state"]["state"], s["state"]["inc"]
        self._write(self._struct.pack(seq, batch, state & _WORD, state >> 64, inc & _WORD, inc >> 64,
                                      s["uinteger"], s["has_uint32"], *versions))


_WORD = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# Where the files go


def log_dir(run_dir) -> Path:
    return Path(run_dir) / LOG_DIR


def open_shard_log(cfg, index: int) -> ShardLog | None:
    """The shard's log in the run directory; None when the run has no explicit run_dir or
    ``cluster.update_log`` is false."""
    if not cfg.run_dir or not cfg.cluster.update_log:
        return None
    path, restart = log_dir(cfg.run_dir) / f"ps{index}.log", 0
    while path.exists():  # a restarted shard (restored from a checkpoint: not replayable) keeps the first log
        restart += 1
        path = path.with_name(f"ps{index}.restart{restart}.log")
    return ShardLog(path, index, cfg.cluster.mode)


def open_worker_log(cfg, worker: int, data_shard: int, num_data_shards: int, seed: int, num_shards: int):
    """This worker process's log (None as for `open_shard_log`)."""
    if not cfg.run_dir or not cfg.cluster.update_log:
        return None
    path, again = log_dir(cfg.run_dir) / f"worker{worker}.{os.getpid()}.log", 0
    while path.exists():  # a restarted container may get the same pid (1) again
        again += 1
        path = path.with_name(f"worker{worker}.{os.getpid()}.{again}.log")
    return WorkerLog(path, worker, data_shard, num_data_shards, seed, num_shards)


# ----------------------------------------------------------------------------------------------
# Reading


class LogError(ValueError):
    """A log file that is missing, truncated or not an update log."""


def read_log(path) -> tuple[dict, np.ndarray]:
    """(header, records as a numpy structured array) of one log file."""
    data = Path(path).read_bytes()
    line, sep, body = data.partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LogError(f"{path}: not an update log of format {FORMAT}")
    dtype = _dtype(header["fields"])
    whole = len(body) // dtype.itemsize * dtype.itemsize  # a torn last record (killed writer) is ignored
    return header, np.frombuffer(body[:whole], dtype=dtype)


class Step(NamedTuple):
    """One gradient of a worker, as its log recorded it."""

    worker: int
    seq: int
    batch: int
    rng_state: dict
    versions: tuple[int, ...]
    data_shard: int
    num_data_shards: int
    seed: int
    process: float  # when the worker process that wrote it started (a restarted worker: a new one)


def read_worker_logs(folder) -> dict[tuple[int, int], Step]:
    """Every worker log of a run: (worker, seq) -> Step. Files of later incarnations win."""
    files = []
    for path in sorted(Path(folder).glob("worker*.log")):
        header, records = read_log(path)
        files.append((header["started"], header, records))
    steps = {}
    for _, h, records in sorted(files, key=lambda f: f[0]):
        for r in records:
            state = int(r["state"][0]) | int(r["state"][1]) << 64
            inc = int(r["inc"][0]) | int(r["inc"][1]) << 64
            rng_state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                         "has_uint32": int(r["has_uint32"]), "uinteger": int(r["uinteger"])}
            steps[h["worker"], int(r["seq"])] = Step(h["worker"], int(r["seq"]), int(r["batch"]), rng_state,
                                                     tuple(int(v) for v in r["versions"]), h["data_shard"],
                                                     h["num_data_shards"], h["seed"], h["started"])
    return steps
