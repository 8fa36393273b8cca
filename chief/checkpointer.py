"""The chief's side of checkpoints: when to take one, taking it, restoring every shard from one.

Taking one: pause every shard (a push arriving meanwhile waits; `Pause` returns once no update
is in progress, so all shards stop at known versions), snapshot every shard over gRPC (the
shards need no filesystem shared with the chief), resume, then write the files while training
goes on. The pause lasts only as long as the snapshots' transfer; it is measured and logged
(`kind: checkpoint` rows of metrics.jsonl, `pause_ms`).
"""
from __future__ import annotations

import time
from pathlib import Path

from asyncps.chief import checkpoint as ckpt
from asyncps.config import Config


def checkpoint_dir(cfg: Config, run_dir: Path) -> Path:
    """`checkpoint.dir`, or RUN_DIR/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


class Checkpointer:
    """Takes checkpoints of the shards behind `ps` (a PSClient) every N steps and/or seconds."""

    def __init__(self, cfg: Config, run_dir: Path, ps, placement, log):
        self.cfg, self.ps, self.placement, self.log = cfg, ps, placement, log
        self.folder = checkpoint_dir(cfg, run_dir)
        self.every_steps = cfg.checkpoint.every_steps
        self.every_seconds = cfg.checkpoint.every_seconds or 0
        self.next_step = self.every_steps or None
        self.last_time = time.monotonic()
        self.pauses_ms: list[float] = []
        self.last: Path | None = None
        if cfg.checkpoint.enabled:
            ckpt.cleanup(self.folder, cfg.checkpoint.keep)  # leftovers of a crash mid-write

    @property
    def enabled(self) -> bool:
        return self.cfg.checkpoint.enabled

    def restart_from(self, step: int) -> None:
        """Schedule the next checkpoint after `step` (at start, resume, or a restore)."""
        if self.every_steps:
            self.next_step = (step // self.every_steps + 1) * self.every_steps
        self.last_time = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.next_step is not None and step >= self.next_step
        by_time = self.every_seconds > 0 and time.monotonic() - self.last_time >= self.every_seconds
        return by_steps or by_time

    def save(self, seconds: float, already_paused: bool = False) -> dict:
        """Pause, snapshot, resume (unless `already_paused`: the final one), write; the log row."""
        started = time.perf_counter()
        if not already_paused:
            self.ps.pause()
        try:
            snapshots = self.ps.snapshot()
        finally:
            if not already_paused:
                self.ps.resume()
        pause_ms = (time.perf_counter() - started) * 1e3
        written = time.perf_counter()
        path = ckpt.write_checkpoint(self.folder, snapshots, self.placement, self.cfg.to_dict(),
                                     {"seconds": seconds, "pause_ms": pause_ms})
        removed = ckpt.cleanup(self.folder, self.cfg.checkpoint.keep)
        write_ms = (time.perf_counter() - written) * 1e3
        step = min(s.version for s in snapshots)
        self.last, self.pauses_ms = path, self.pauses_ms + [pause_ms]
        self.restart_from(step)
        return self.log.write("checkpoint", step, path=str(path), versions=[s.version for s in snapshots],
                              pause_ms=round(pause_ms, 3), write_ms=round(write_ms, 3),
                              bytes=sum(f.stat().st_size for f in path.iterdir()), removed=[p.name for p in removed])

    def latest(self, warn=None) -> ckpt.Checkpoint | None:
        return ckpt.latest_valid(self.folder, warn)

    def restore(self, checkpoint: ckpt.Checkpoint) -> list[int]:
        """Restores EVERY shard from `checkpoint` (re-split for this placement); their versions."""
        versions = self.ps.restore(checkpoint.snapshots_for(self.placement))
        self.restart_from(min(versions))
        return versions

    def summary(self) -> dict:
        p = self.pauses_ms
        return {"count": len(p), "dir": str(self.folder), "last": str(self.last) if self.last else None,
                "pause_ms_mean": sum(p) / len(p) if p else None, "pause_ms_max": max(p) if p else None}
