"""SparseRows: a gradient (or update) that touches only some rows of a variable.

One type for the whole system: the autodiff engine returns it for an embedding lookup, the
codec puts it on the wire, the partitioner cuts it by rows, and the shard applies it to the
rows it names only.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
