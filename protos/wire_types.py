"""The leaf types the wire carries, at the bottom of the import graph.

protos/ is the lowest layer and imports nothing of asyncps outside protos/, so the values the
codec encodes (`SparseRows`, `Snapshot`, `PushResult`) are defined here, and the errors the
transport raises (`UserError`, `ConfigError`, `DataError`: protos/wire_errors.py) re-exported. The shared layer re-exports them
under their old homes (asyncps.sparse, asyncps.shard_types, asyncps.errors), so every other
module keeps importing them from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from asyncps.protos.wire_errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "PushResult", "Snapshot", "SparseRows", "UserError"]


class SparseRows(NamedTuple):
    """``values[k]`` belongs to row ``rows[k]`` of a variable of shape `dense_shape`.

    `dense_shape` is known where the gradient is made (the tape) and may be None after the
    wire, where the shard supplies the variable's shape.
    """

    rows: np.ndarray  # int64, shape (k,)
    values: np.ndarray  # shape (k, *row_shape)
    dense_shape: tuple | None = None

    @classmethod
    def from_duplicates(cls, rows, values, dense_shape=None) -> "SparseRows":
        """Sum the rows of `values` that share an index, giving unique sorted `rows`."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        summed = np.zeros((len(uniq),) + values.shape[1:], dtype=values.dtype)
        np.add.at(summed, inverse.ravel(), values)
        return cls(uniq, summed, None if dense_shape is None else tuple(dense_shape))

    def to_dense(self, shape: tuple | None = None) -> np.ndarray:
        """The full array (zeros outside `rows`); `shape` is needed when `dense_shape` is unknown."""
        shape = shape or self.dense_shape
        if shape is None:
            raise ValueError("SparseRows.to_dense: no shape given and dense_shape unknown (rows from the wire)")
        dense = np.zeros(shape, dtype=self.values.dtype)
        dense[self.rows] = self.values
        return dense

    @property
    def dtype(self):
        return self.values.dtype


@dataclass
class Snapshot:
    """A shard's state at one version: values, optimizer slots and per-worker counters."""

    version: int
    values: dict[str, np.ndarray]
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> slot -> array
    updates: dict[str, int] = field(default_factory=dict)  # name -> updates applied to it
    last_seq: dict[int, int] = field(default_factory=dict)  # worker -> highest push seq seen
    clocks: dict[int, int] = field(default_factory=dict)  # worker -> pushes applied
    optimizer: str = ""


class PushResult(NamedTuple):
    """What the shard did with a push: APPLIED, ACCUMULATED, DROPPED or DUPLICATE (the names of
    PushReply.Result), the shard's version after it, and the push's staleness if applied."""

    result: str
    version: int
    staleness: int
