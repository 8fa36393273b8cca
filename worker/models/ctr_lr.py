"""`ctr_lr`: logistic regression on hashed features, the CTR baseline.

One weight per feature id (an id table of width 1: rows made on first touch, so the model has a
weight for every value ever seen and none for the 10^8 never seen) plus a bias:
logit = bias + sum over the example's ids of w(id). The numeric counts arrive as ids of their
log-buckets (worker/data/click_features.py), so their weights are learned per bucket.
"""
from __future__ import annotations

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import zeros
from asyncps.worker.models.click import ClickModel

TABLE = "ctr_lr.weights"


class CTRLogistic(ClickModel):
    name = "ctr_lr"
    table = TABLE

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        self.id_tables = {TABLE: 1}

    def init_params(self, rng):
        return {"bias": zeros(1)}

    def click_logit(self, params, x):
        w = ops.reshape(ops.gather(params[TABLE], x), (-1, self.fields))
        return ops.add(ops.sum(w, axis=1), params["bias"])
