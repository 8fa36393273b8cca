"""What the click models (ctr_lr, ctr_deep) share: one logit per example over id-table rows,
trained by log loss, evaluated by log loss, AUC and accuracy.

A subclass defines `click_logit(params, x)`: x holds each example's feature ids (during a step,
indices into the batch's rows: worker/tables.py), the result a Tensor of shape (n,). The loss is
the softmax cross-entropy of the two logits (0, z), which is exactly the log loss of sigmoid(z),
so the shards, the chief and `asyncps train` need nothing new.
"""
from __future__ import annotations

import numpy as np

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, batches, meta_get
from asyncps.worker.models.metrics import auc, log_loss_of_logits
from asyncps.worker.tables import localize


class ClickModel(Model):
    table = ""  # the id table's name (each subclass: one table, as `asyncps train` and the shards serve)

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        self.fields = int(meta_get(data_meta, "input_shape", (39,))[0])
        self.tables = frozenset({self.table})

    def click_logit(self, params, x):
        raise NotImplementedError

    def logits(self, params, x, training: bool = False, rng=None):
        z = ops.reshape(self.click_logit(params, x), (-1, 1))
        return ops.concat(np.zeros((len(x), 1), np.float32), z, axis=1)  # softmax of (0, z) = sigmoid(z)

    def evaluate(self, params: dict, x, y, batch_size: int = 4096) -> dict[str, float]:
        """Log loss (``loss``), AUC and accuracy over raw ids `x`; rows come from
        ``params[table].rows(ids)`` one batch at a time (nothing is created)."""
        source, scores = params[self.table], []
        for s in batches(len(x), batch_size):
            ids, local = localize(x[s])
            scores.append(np.asarray(self.click_logit({**params, self.table: source.rows(ids)}, local).value,
                                     np.float64).reshape(-1))
        z = np.concatenate(scores)
        return {"loss": log_loss_of_logits(z, y), "auc": auc(z, y), "accuracy": float(np.mean((z > 0) == (y == 1)))}
