"""What `asyncps launch` shows while a cluster trains, read from the chief's metrics.jsonl.

The launcher holds no gRPC object (it forks its children), so it follows the run the way a user
could: it tails the rows the chief appends (`progress`, `eval`, `telemetry`, membership events,
`failure`, ...). On a terminal one line is redrawn in place (global step / max, steps/s, the
last evaluation, the staleness mean, workers alive, restarts); otherwise a plain line is
written every `every_seconds`. Failures (a dead worker, a shard restored from a checkpoint, a
checkpoint that could not be written) are printed as they happen, one line each.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

# Rows whose `message` is printed as it arrives (the chief's own one-line notices).
NOTICE_KINDS = ("checkpoint_refused", "checkpoint_failed", "start_barrier", "eval_skipped")
RATE_WINDOW = 3.0  # seconds of rows the steps/s on the live line is measured over


class RunWatcher:
    """Follows metrics.jsonl from its current end; `poll()` reads new rows and redraws."""

    def __init__(self, run_dir: str | Path, max_steps: int, workers: int, stream: TextIO | None = None,
                 every_seconds: float = 5.0, clock=time.monotonic):
        stream = sys.stderr if stream is None else stream  # the stderr of the moment, not of import time
        self.path = Path(run_dir) / "metrics.jsonl"
        self.max_steps, self.workers, self.stream = max_steps, workers, stream
        self.tty = stream.isatty()
        self.every, self.clock = every_seconds, clock
        self._offset = self.path.stat().st_size if self.path.exists() else 0  # a resumed run appends
        self._partial = b""
        self.step = 0
        self.rate: float | None = None
        self.last_eval: tuple[int, dict] | None = None
        self.staleness_mean: float | None = None
        self.alive: set[int] = set()
        self.restarts = 0
        self.stopping = False
        self.started = False  # the chief's `start` row (step 0, after the start barrier)
        self._recent: deque[tuple[float, int]] = deque()  # (row time, step) of the last RATE_WINDOW s
        self._last_plain = clock()
        self._line_len = 0
        self._drawn = ""  # the live line on the terminal now

    # -- input ----------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """Complete rows appended since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def poll(self, restarts: int = 0) -> None:
        self.restarts = restarts
        for row in self.rows():
            self._take(row)
        self._draw()

    def _take(self, row: dict) -> None:
        kind, step = row.get("kind"), int(row.get("step", 0))
        if kind == "start":
            self.started = True
        if kind in ("progress", "eval", "telemetry", "checkpoint"):
            self._advance(step, row.get("time"))
        if kind == "eval":
            metrics = {k: v for k, v in row.items() if k in ("accuracy", "loss", "mse", "perplexity")}
            self.last_eval = (step, metrics)
        elif kind == "telemetry" and (row.get("staleness") or {}).get("count"):
            self.staleness_mean = row["staleness"]["mean"]
        elif kind in ("worker_joined", "worker_adopted") and isinstance(row.get("worker"), int):
            self.alive.add(row["worker"])
        elif kind == "worker_dead":
            self.alive.discard(row.get("worker"))
            if not self.stopping:
                self.event(f"worker {row.get('worker')} declared dead at step {step} (no heartbeat, or its process is gone)")
        elif kind == "failure":
            self.event(f"{row.get('role')} {row.get('index')} failed at step {row.get('at_step')}; model restored to "
                       f"step {row.get('restored_step')} ({row.get('steps_lost')} steps lost)")
        elif kind in NOTICE_KINDS and row.get("message"):
            self.event(f"{kind.replace('_', ' ')}: {row['message']}")
        elif kind == "final":
            self.stopping = True

    def _advance(self, step: int, at: float | None) -> None:
        """The global step, and steps/s over the rows of the last RATE_WINDOW seconds (the chief's
        clock, so the launcher's own delays do not show)."""
        if at is not None and step > self.step:
            self._recent.append((at, step))
            while len(self._recent) > 2 and at - self._recent[0][0] > RATE_WINDOW:
                self._recent.popleft()
            first_at, first_step = self._recent[0]
            if at > first_at:
                self.rate = (step - first_step) / (at - first_at)
        self.step = max(self.step, step)

    # -- output ---------------------------------------------------------------------------------

    def status(self) -> str:
        if not self.started and not self.step:
            return "starting: shards, chief and workers are coming up and loading data"
        parts = [f"step {min(self.step, self.max_steps)}/{self.max_steps}"]
        if self.rate is not None:
            parts.append(f"{self.rate:.0f} steps/s")
        if self.last_eval is not None:
            step, metrics = self.last_eval
            parts.append("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f" @{step}")
        if self.staleness_mean is not None:
            parts.append(f"staleness {self.staleness_mean:.2f}")
        parts.append(f"workers {len(self.alive)}/{self.workers}")
        parts.append(f"restarts {self.restarts}")
        return "  ".join(parts)

    def _draw(self) -> None:
        line = self.status()
        if self.tty:
            if line == self._drawn:
                return
            self._drawn = line
            self.stream.write("\r" + line.ljust(self._line_len))
            self._line_len = len(line)
            self.stream.flush()
        elif self.clock() - self._last_plain >= self.every:
            self._last_plain = self.clock()
            self.stream.write(line + "\n")
            self.stream.flush()

    def event(self, message: str) -> None:
        """One line for something that happened, above the live line."""
        if self.tty and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self._line_len, self._drawn = 0, ""
        self.stream.write(f"asyncps launch: {message}\n")
        self.stream.flush()

    def close(self) -> None:
        """Reads the last rows and ends the live line."""
        for row in self.rows():
            self._take(row)
        if self.tty and self._line_len:
            self.stream.write("\r" + self.status().ljust(self._line_len) + "\n")
            self._line_len = 0
        self.stream.flush()
