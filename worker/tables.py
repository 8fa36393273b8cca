"""A batch's view of id-keyed embedding tables (ps/tables.py): what a step pulls and pushes.

A model with id tables (`Model.id_tables`: name -> row width) reads a table with `ops.gather`
like any embedding, but the table is not in its parameters: each step `localize`s the batch's
ids (the unique ids, and the batch rewritten as indices into them), fetches just those rows, and
passes them as the table's parameter. The gradient is then `SparseRows` over local indices, which
`rows_of` turns back into (ids, row gradients) for the push. Bytes per step grow with the unique
ids of the batch, never with the table.

For evaluation the table's parameter is a `RowSource` (anything with ``rows(ids) -> array``) and
the model localizes each evaluation batch itself (worker/models/ctr.py).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from asyncps.sparse import SparseRows


class RowSource(Protocol):
    """Where evaluation reads table rows from: the rows of `ids` (unseen ids: their first values)."""

    def rows(self, ids: np.ndarray) -> np.ndarray: ...


def localize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique ids, `x` as indices into them, same shape)."""
    ids, local = np.unique(np.asarray(x, dtype=np.int64), return_inverse=True)
    return ids, local.reshape(np.shape(x))


def rows_of(grad, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, row gradients) of a table's gradient over local indices (SparseRows, or a dense
    array over all local rows)."""
    if isinstance(grad, SparseRows):
        return ids[grad.rows], np.asarray(grad.values, dtype=np.float32)
    return ids, np.asarray(grad, dtype=np.float32)
