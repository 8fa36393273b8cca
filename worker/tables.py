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


class TableBatches:
    """A cluster worker's batches when its model has an id-keyed table (worker/main.py).

    The batch after the current one is read ahead, so that its unique ids travel with the push
    of the current one and its rows come back in the same round trip (PSClient.push_pull_rows):
    one round trip per step, as for a dense model. `upcoming` is the batch whose rows the next
    pull (or push-pull) brings; `advance` reads the one after it.
    """

    def __init__(self, name: str, stream, x: np.ndarray):
        self.name, self.stream, self.x = name, stream, x
        self.upcoming = self._read()

    def _read(self):
        indices, batch = next(self.stream)
        ids, local = localize(self.x[indices])
        return indices, batch, ids, local

    def wanted(self) -> dict[str, np.ndarray]:
        """{table: unique ids} of the upcoming batch."""
        return {self.name: self.upcoming[2]}

    def advance(self):
        """The upcoming batch (indices, batch id, unique ids, x as local indices); the one after
        it becomes upcoming."""
        current, self.upcoming = self.upcoming, self._read()
        return current


def table_grad(grad, ids: np.ndarray, read_versions: np.ndarray):
    """(ids, summed row gradients, versions read) of one table's gradient over local indices
    (`read_versions`: the versions of the rows of `ids`, as pulled)."""
    touched, values = rows_of(grad, ids)
    read = read_versions[grad.rows] if isinstance(grad, SparseRows) else read_versions
    return touched, values, read
