"""Id-keyed embedding tables in `asyncps train`: the store of ps/tables.py in this process.

A model with `id_tables` (worker/models/ctr.py) keeps its tables outside its parameters: each
step localizes the batch's ids, pulls just those rows (created on first touch), computes the
gradient on them and pushes the row gradients back through the optimizer's row-wise update, as a
cluster worker will do against the shards. Evaluation reads rows without creating any.
(In `cli/`: it joins the worker's batch logic and the shard's store, which no role does.)
"""
from __future__ import annotations

import numpy as np

from asyncps.errors import UserError
from asyncps.ps.optim import make_optimizer
from asyncps.ps.tables import EmbeddingTable
from asyncps.worker.tables import localize, rows_of


class _Rows:
    """A table as evaluation reads it (`worker.tables.RowSource`)."""

    def __init__(self, table: EmbeddingTable):
        self.table = table

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.table.peek(ids)


class LocalIdTables:
    """The model's id tables, one EmbeddingTable each, with the run's optimizer (its own slots)."""

    def __init__(self, cfg, model):
        tables = dict(getattr(model, "id_tables", {}) or {})
        if len(tables) != 1:
            raise UserError(f"model {model.name}: id-keyed tables read the batch's ids: one table per model, "
                            f"got {sorted(tables)}")
        if cfg.staleness.controlled or cfg.staleness.simulate is not None or cfg.train.graph_mode:
            raise UserError("id-keyed tables (model.name ctr) train without staleness.controlled, "
                            "staleness.simulate and train.graph_mode for now")
        ((self.name, dim),) = tables.items()
        self.table = EmbeddingTable(self.name, dim, cfg.seed, make_optimizer(cfg.optimizer))

    def step(self, compute, params: dict, x, y, rng, lr: float):
        """One step's loss and dense gradients; the table's rows are pulled, trained and pushed."""
        ids, local = localize(x)
        rows, versions = self.table.pull(ids)
        loss, grads = compute({**params, self.name: rows}, local, y, rng)
        grad = grads.pop(self.name)
        touched, values = rows_of(grad, ids)
        read = versions[grad.rows] if hasattr(grad, "rows") else versions
        self.table.push(touched, values, read, lr)
        return loss, grads

    def sources(self) -> dict:
        return {self.name: _Rows(self.table)}

    def report(self) -> dict:
        return {self.name: dict(self.table.stats())}


def make_id_tables(cfg, model) -> LocalIdTables | None:
    return LocalIdTables(cfg, model) if getattr(model, "id_tables", None) else None
