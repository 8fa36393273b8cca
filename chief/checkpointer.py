"""The chief's side of checkpoints: when to take one, taking it, restoring every shard from one.

Taking one: pause every shard (a push arriving meanwhile waits; `Pause` returns once no update
is in progress, so all shards stop at known versions), snapshot every shard over gRPC (the
shards need no filesystem shared with the chief), resume, then write the files while training
goes on. The pause lasts only as long as the snapshots' transfer; it is measured and logged
(`kind: checkpoint` rows of metrics.jsonl, `pause_ms`).

A checkpoint that cannot be written (ENOSPC, EACCES, a read-only or vanished folder: any
OSError while writing) is one line in the chief's log naming the cause, a `checkpoint_failed`
row, and a count in report.json (`checkpoints.failed`, `last_error`); the run goes on, the
earlier checkpoints stay as they were, and the next attempt is at the next interval. The shards
are resumed whatever happens between the pause and the snapshot's end.

Id-keyed tables (docs/sparse.md): while the shards are paused, each table's rows are streamed
from every shard (SnapshotTable) chunk by chunk into a staging folder beside the checkpoints
(chief/checkpoint.py), so the pause also covers writing them: the rows a checkpoint holds are
exactly those of its version. A restore stages every table on every shard first (RestoreTable,
rows re-placed by hash), then the Restore of the variables installs them at once.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from asyncps.chief import checkpoint as ckpt
from asyncps.config import CheckpointConfig, Config

logger = logging.getLogger(__name__)


def checkpoint_dir(section: CheckpointConfig, run_dir: Path) -> Path:
    """`checkpoint.dir` (the config's checkpoint section), or RUN_DIR/checkpoints."""
    return Path(section.dir) if section.dir else Path(run_dir) / "checkpoints"


class Checkpointer:
    """Takes checkpoints of the shards behind `ps` (a PSClient) every N steps and/or seconds."""

    def __init__(self, cfg: Config, run_dir: Path, ps, placement, log):
        self.cfg, self.ps, self.placement, self.log = cfg, ps, placement, log
        self.folder = checkpoint_dir(cfg.checkpoint, run_dir)
        self.every_steps = cfg.checkpoint.every_steps
        self.every_seconds = cfg.checkpoint.every_seconds or 0
        self.next_step = self.every_steps or None
        self.last_time = time.monotonic()
        self.pauses_ms: list[float] = []
        self.last: Path | None = None
        self.failed = 0
        self.last_error: str | None = None
        if cfg.checkpoint.enabled:
            try:
                ckpt.cleanup(self.folder, cfg.checkpoint.keep)  # leftovers of a crash mid-write
            except OSError as exc:  # e.g. an unreadable folder: the first save says it again
                logger.warning(f"chief: cannot clean up {self.folder}: {exc}")

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
        """Pause, snapshot, resume (unless `already_paused`: the final one), write; the log row.

        A write that fails (OSError) returns a `checkpoint_failed` row instead of raising; an
        error of the shards (pause, snapshot) is counted and raised (the caller's next poll
        repairs a dead shard). The shards are resumed in every case.
        """
        started = time.perf_counter()
        tables, table_error = None, None
        try:
            try:
                if not already_paused:
                    self.ps.pause()
                snapshots = self.ps.snapshot()
                if getattr(self.ps, "tables", None):
                    try:
                        tables = self._save_tables(min(s.version for s in snapshots))
                    except OSError as exc:  # the disk, not the shards: a checkpoint_failed row
                        table_error = exc
            finally:
                if not already_paused:
                    self.ps.resume()  # every shard, also when the pause reached only some
        except Exception as exc:
            self.failed, self.last_error = self.failed + 1, f"snapshot: {_cause(exc)}"
            raise
        pause_ms = (time.perf_counter() - started) * 1e3
        step = min(s.version for s in snapshots)
        if table_error is not None:
            return self._failed(step, table_error)
        written = time.perf_counter()
        try:
            path = ckpt.write_checkpoint(self.folder, snapshots, self.placement, self.cfg.to_dict(),
                                         {"seconds": seconds, "pause_ms": pause_ms}, tables=tables)
            size = sum(f.stat().st_size for f in path.iterdir())
        except OSError as exc:
            return self._failed(step, exc)
        try:
            removed = ckpt.cleanup(self.folder, self.cfg.checkpoint.keep)
        except OSError as exc:
            logger.warning(f"chief: checkpoint at step {step} written; removing older ones failed: {exc}")
            removed = []
        write_ms = (time.perf_counter() - written) * 1e3
        self.last, self.pauses_ms = path, self.pauses_ms + [pause_ms]
        self.restart_from(step)
        return self.log.write("checkpoint", step, path=str(path), versions=[s.version for s in snapshots],
                              pause_ms=round(pause_ms, 3), write_ms=round(write_ms, 3),
                              bytes=size, removed=[p.name for p in removed])

    def _save_tables(self, step: int):
        """(staging folder, manifest entries) of every table's rows, streamed from each shard."""
        staging = ckpt.table_staging(self.folder, step)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            entries = []
            for k, (name, dim) in enumerate(sorted(self.ps.tables.items())):
                parts = ((i, *self.ps.snapshot_table(i, name, ckpt.table_chunk_rows(dim)))
                         for i in range(self.placement.num_shards))
                entries.append(ckpt.write_table(staging, k, name, dim, parts))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, entries

    def _failed(self, step: int, exc: OSError) -> dict:
        """One line, one row, one count; the next attempt at the next interval."""
        self.failed, self.last_error = self.failed + 1, f"step {step}: {_cause(exc)}"
        last = self.last or self._newest_on_disk()
        message = (f"checkpoint at step {step} failed: {_cause(exc)}; the last good one is {last or 'none'}; "
                   f"retrying at the next interval")
        logger.warning(f"chief: {message}")
        self.restart_from(step)
        return self.log.write("checkpoint_failed", step, message=message, error=_cause(exc),
                              errno=getattr(exc, "errno", None), last_good=str(last) if last else None)

    def _newest_on_disk(self) -> Path | None:
        try:
            found = ckpt.list_checkpoints(self.folder)
        except OSError:
            return None
        return found[-1] if found else None

    def latest(self, warn=None) -> ckpt.Checkpoint | None:
        return ckpt.latest_valid(self.folder, warn)

    def restore(self, checkpoint: ckpt.Checkpoint) -> list[int]:
        """Restores EVERY shard from `checkpoint` (re-split for this placement; table rows
        re-placed by hash); their versions."""
        snapshots = checkpoint.snapshots_for(self.placement)  # (checks the variables first)
        n = self.placement.num_shards
        for table in checkpoint.tables:
            if table["name"] not in (getattr(self.ps, "tables", None) or {}):
                raise ckpt.CheckpointError(f"{checkpoint.path}: table {table['name']!r} is not one of the model's")
            updates = max((p["updates"] for p in table["parts"]), default=0)
            for i in range(n):
                self.ps.restore_table(i, table["name"], table["dim"], updates, checkpoint.table_chunks_for(table, i, n))
        versions = self.ps.restore(snapshots)
        self.restart_from(min(versions))
        return versions

    def summary(self) -> dict:
        """report.json's `checkpoints`: `count` (= `written`), `failed`, `last_error`, pauses."""
        p = self.pauses_ms
        return {"count": len(p), "written": len(p), "failed": self.failed, "last_error": self.last_error,
                "dir": str(self.folder), "last": str(self.last) if self.last else None,
                "pause_ms_mean": sum(p) / len(p) if p else None, "pause_ms_max": max(p) if p else None}


def _cause(exc: BaseException) -> str:
    """One line: the exception's message (an OSError's names the errno and the file)."""
    text = str(exc).replace("\n", " ").strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
