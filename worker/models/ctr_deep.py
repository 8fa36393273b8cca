"""`ctr_deep`: wide & deep (Cheng et al. 2016) over one id table.

Each id's row is [w, e_1 .. e_k] (k = model.embed_dim): w is its logistic-regression weight (the
wide part: every id's own effect, learned as fast as ctr_lr learns it), e its embedding. The
examples' embeddings, concatenated field after field, go through ReLU layers of widths
model.hidden to one output (the deep part: interactions between fields, which no sum of
per-id weights can represent):

    logit = bias + sum_f w(id_f) + mlp(concat_f e(id_f))

Why not a pure MLP over embeddings: the MLP must then relearn each id's additive effect through
k random coordinates, and the long tail of rare ids never gets there; why not a factorization
machine: its interactions are dot products of embeddings, one fixed form, where the MLP learns
whatever the data holds. One table of width 1 + k keeps the id-table interface (one table per
model; worker/tables.py) and pulls each id's two parts in one row.
"""
from __future__ import annotations

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import dense, dense_params, zeros
from asyncps.worker.models.click import ClickModel

TABLE = "ctr_deep.rows"


class CTRDeep(ClickModel):
    name = "ctr_deep"
    table = TABLE

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        self.embed_dim = cfg.embed_dim
        self.hidden = list(cfg.hidden)
        self.id_tables = {TABLE: 1 + self.embed_dim}

    def init_params(self, rng):
        params, width = {"bias": zeros(1)}, self.fields * self.embed_dim
        for i, h in enumerate(self.hidden):
            params.update(dense_params(f"hidden{i}", rng, width, h, relu=True))
            width = h
        params.update(dense_params("output", rng, width, 1, relu=False))
        return params

    def click_logit(self, params, x):
        rows = ops.gather(params[TABLE], x)  # (n, fields, 1 + k)
        wide = ops.sum(ops.reshape(ops.getitem(rows, (slice(None), slice(None), 0)), (-1, self.fields)), axis=1)
        h = ops.reshape(ops.getitem(rows, (slice(None), slice(None), slice(1, None))), (-1, self.fields * self.embed_dim))
        for i in range(len(self.hidden)):
            h = ops.relu(dense(params, f"hidden{i}", h))
        deep = ops.reshape(dense(params, "output", h), (-1,))
        return ops.add(ops.add(wide, deep), params["bias"])
