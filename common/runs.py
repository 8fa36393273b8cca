"""The run directory: where every run leaves its config, logs, metrics.jsonl and report.json."""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from asyncps.atomic import atomic_save_npz, atomic_write_json, jsonable
from asyncps.config import Config, TargetConfig
from asyncps.errors import UserError

REPORT_SCHEMA_VERSION = 1


def resolve_run_dir(cfg: Config, default_root: str = "runs") -> Path:
    """`cfg.run_dir`, or runs/<name>-<YYYYmmdd-HHMMSS> when unset; created if missing."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        path = Path(default_root) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".asyncps-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run_dir {path}: cannot be created or written ({exc.strerror or exc})") from None
    return path


class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl, each with `kind`, `step` and `time`.

    `time` is seconds since the run started (wall clock), so runs can be overlaid by time.
    """

    def __init__(self, path: str | Path, start_time: float | None = None, hold: bool = False):
        self.path = Path(path)
        self.start = time.time() if start_time is None else start_time
        self._file = self.path.open("a", buffering=1)
        self._held: list[tuple[float, dict]] | None = [] if hold else None
        self._lock = threading.Lock()  # rows come from gRPC handler threads too

    def write(self, kind: str, step: int, **values: Any) -> dict:
        now = time.time()
        row = {"kind": kind, "step": int(step), "time": round(now - self.start, 4), **values}
        with self._lock:
            if self._held is not None:  # before the zero point is known: written by `release`
                self._held.append((now, row))
            else:
                self._file.write(json.dumps(row, default=jsonable) + "\n")
        return row

    def release(self, start: float) -> None:
        """Fixes the zero point (`start`, wall clock) and writes the rows held until now, their
        `time` counted from it (negative: before step 0)."""
        with self._lock:
            self.start, held, self._held = start, self._held or [], None
            for at, row in held:
                row["time"] = round(at - start, 4)
                self._file.write(json.dumps(row, default=jsonable) + "\n")

    def close(self) -> None:
        if self._held is not None:
            self.release(self.start)
        self._file.close()


def write_report(run_dir: str | Path, report: dict) -> Path:
    """Write report.json atomically (schema documented in the README)."""
    return atomic_write_json(Path(run_dir) / "report.json", {"schema": REPORT_SCHEMA_VERSION, **report})


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One progress line on a terminal (redrawn in place); plain log lines when not a TTY."""

    def __init__(self, total: int, stream: TextIO | None = None, every: int = 100):
        # the stderr of the moment, not of import time (a caller, or pytest, may have replaced it since)
        stream = sys.stderr if stream is None else stream
        self.total, self.stream, self.every = total, stream, every
        self.tty = stream.isatty()
        self.start = time.time()
        self.last_line, self.done = -1, False

    def update(self, step: int, **info: Any) -> None:
        if not self.tty:  # plain lines: one each time a multiple of `every` is passed
            if step // self.every == self.last_line and (step != self.total or self.done):
                return
            self.last_line, self.done = step // self.every, step == self.total
        elapsed = time.time() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        if self.tty:
            filled = int(30 * step / max(self.total, 1))
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {rate:.0f} steps/s {parts}   ")
        else:
            self.stream.write(f"step {step}/{self.total} {rate:.0f} steps/s {parts}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)



def target_reached(metrics: dict, target: TargetConfig) -> bool:
    """Accuracy must rise to the target; loss and mse must fall to it."""
    if target.value is None or target.metric not in metrics:
        return False
    value = metrics[target.metric]
    return value >= target.value if target.metric == "accuracy" else value <= target.value


@dataclass
class TargetTracker:
    """Remembers the first evaluation at which the target was reached."""

    target: TargetConfig
    step: int | None = None
    seconds: float | None = None
    metrics: dict | None = None  # the evaluation that reached it

    def observe(self, step: int, seconds: float, metrics: dict) -> bool:
        if self.step is None and target_reached(metrics, self.target):
            self.step, self.seconds, self.metrics = step, seconds, dict(metrics)
        return self.step is not None

    def as_dict(self) -> dict:
        t = self.target
        return {"metric": t.metric, "value": t.value, "reached": self.step is not None,
                "step": self.step, "seconds": self.seconds, "metrics": self.metrics}


def small_variables(params: dict, limit: int = 16) -> dict:
    """Values of variables with at most `limit` entries (the linear example's w and b)."""
    return {n: np.asarray(v).ravel().tolist() for n, v in sorted(params.items()) if np.size(v) <= limit}


PARAMS_FILE = "params.npz"


def save_params(path, params: dict) -> None:
    """The final weights, keyed by variable name (npz, loadable with allow_pickle=False)."""
    atomic_save_npz(path, params)


def load_params(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}
