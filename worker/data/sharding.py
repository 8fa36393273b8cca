"""Deterministic per-worker batches: disjoint shards, reshuffled each epoch, resumable at any step.

Worker i of M reads part i of one fixed permutation of the training set (seeded by `seed`
alone, so every process computes the same split), cut into M near-equal parts. Each epoch the
worker visits its part in a fresh order drawn from (seed, worker_index, epoch). Batches are
always full: the last ``len(shard) % batch_size`` examples of each epoch's order are dropped,
and since the order changes every epoch, a different few each time.

Batch number `step` of a worker is a pure function of (num_examples, batch_size, seed,
worker_index, num_workers, step), so a restarted worker resumes with ``skip_to(step)`` and
reads exactly what it would have read. Changing `num_workers` changes every shard.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from asyncps.errors import ConfigError

# First seed word of each random stream, so the shard permutation and the epoch orders never share one.
_SHARD_TAG, _EPOCH_TAG = 1, 2


class BatchId(NamedTuple):
    """Which batch: the worker, the epoch over its shard, and the batch's position in that epoch."""

    worker: int
    epoch: int
    position: int


class BatchStream:
    """An endless, reproducible stream of ``(indices, BatchId)`` for one worker.

    `indices` (int64, shape (batch_size,)) index the full training set.
    """

    def __init__(self, num_examples: int, batch_size: int, worker_index: int, num_workers: int,
                 seed: int = 0, start_step: int = 0):
        _check_args(num_examples, batch_size, worker_index, num_workers)
        self.batch_size = batch_size
        self.worker_index = worker_index
        self.seed = seed
        self.shard = shard_indices(num_examples, worker_index, num_workers, seed)
        if len(self.shard) < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} is larger than worker {worker_index}'s shard of "
                f"{len(self.shard)} examples ({num_examples} split over {num_workers} workers)"
            )
        self.batches_per_epoch = len(self.shard) // batch_size
        self._epoch, self._order = -1, self.shard
        self.step = 0
        self.skip_to(start_step)

    def skip_to(self, step: int) -> None:
        """Make `step` (0-based count of batches already read) the next batch to be yielded."""
        if step < 0:
            raise ValueError(f"step must be 0 or more, got {step}")
        self.step = step

    def batch_id(self, step: int) -> BatchId:
        """The BatchId of this worker's batch number `step`."""
        epoch, position = divmod(step, self.batches_per_epoch)
        return BatchId(self.worker_index, epoch, position)

    def step_of(self, batch_id: BatchId) -> int:
        """Inverse of `batch_id`."""
        return batch_id.epoch * self.batches_per_epoch + batch_id.position

    def at(self, step: int) -> np.ndarray:
        """The example indices of batch number `step`, without moving the stream."""
        epoch, position = divmod(step, self.batches_per_epoch)
        start = position * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size].copy()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shard in the order of `epoch` (the current epoch's order is cached)."""
        if epoch != self._epoch:
            rng = np.random.default_rng([_EPOCH_TAG, self.seed, self.worker_index, epoch])
            self._epoch, self._order = epoch, self.shard[rng.permutation(len(self.shard))]
        return self._order

    def __iter__(self) -> Iterator[tuple[np.ndarray, BatchId]]:
        return self

    def __next__(self) -> tuple[np.ndarray, BatchId]:
        step = self.step
        self.step += 1
        return self.at(step), self.batch_id(step)


def shard_indices(num_examples: int, worker_index: int, num_workers: int, seed: int = 0) -> np.ndarray:
    """Worker `worker_index`'s part of one seeded permutation of range(num_examples).

    The M parts are disjoint, cover every example, and differ in size by at most one.
    """
    _check_args(num_examples, 1, worker_index, num_workers)
    order = np.random.default_rng([_SHARD_TAG, seed]).permutation(num_examples)
    start = worker_index * num_examples // num_workers
    stop = (worker_index + 1) * num_examples // num_workers
    return order[start:stop]


def _check_args(num_examples: int, batch_size: int, worker_index: int, num_workers: int) -> None:
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in [0, {num_workers}), got {worker_index}")
    if batch_size < 1:
        raise ConfigError(f"train.batch_size must be at least 1, got {batch_size}")
    if num_workers > num_examples:
        raise ConfigError(
            f"cluster.workers={num_workers} is more than the {num_examples} training examples; "
            "every worker needs at least one example of its own"
        )
