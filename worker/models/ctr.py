"""A click-through-rate model over id-keyed embedding tables (hashed categorical features).

Each of the example's F ids (one per field) reads a row of `embed_dim` floats from the id table
``ctr.embed`` (ps/tables.py: rows made on first touch, keyed by 64-bit ids, not by a fixed
vocabulary); the F rows are joined and go through ReLU layers of widths `hidden` to 2 logits
(no click, click). Metrics: log loss, accuracy and AUC (the CTR literature's yardstick).

During a step the table's parameter is the batch's rows and x holds indices into them
(worker/tables.py localize); for evaluation it is a `RowSource` and x holds raw ids.
"""
from __future__ import annotations

import numpy as np

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, batches, dense, dense_params, meta_get
from asyncps.worker.tables import localize

TABLE = "ctr.embed"


class CTR(Model):
    name = "ctr"
    tables = frozenset({TABLE})

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        self.fields = int(meta_get(data_meta, "input_shape", (8,))[0])
        self.embed_dim = cfg.embed_dim
        self.hidden = list(cfg.hidden)
        self.id_tables = {TABLE: self.embed_dim}  # id-keyed: not in init_params, rows fetched per batch

    def init_params(self, rng):
        params, width = {}, self.fields * self.embed_dim
        for i, h in enumerate(self.hidden):
            params.update(dense_params(f"hidden{i}", rng, width, h, relu=True))
            width = h
        params.update(dense_params("output", rng, width, 2, relu=False))
        return params

    def logits(self, params, x, training: bool = False, rng=None):
        h = ops.reshape(ops.gather(params[TABLE], x), (-1, self.fields * self.embed_dim))
        for i in range(len(self.hidden)):
            h = ops.relu(dense(params, f"hidden{i}", h))
        return dense(params, "output", h)

    def evaluate(self, params: dict, x, y, batch_size: int = 2000) -> dict[str, float]:
        """Log loss, accuracy and AUC over (x, y) of raw ids; the table's rows come from
        ``params[TABLE].rows(ids)`` one batch at a time."""
        source, scores, loss_sum, correct = params[TABLE], [], 0.0, 0
        for s in batches(len(x), batch_size):
            ids, local = localize(x[s])
            logits = self.logits({**params, TABLE: source.rows(ids)}, local).value
            loss_sum += float(ops.softmax_cross_entropy(logits, y[s]).value) * len(logits)
            correct += int(np.sum(np.argmax(logits, axis=1) == y[s]))
            scores.append(logits[:, 1] - logits[:, 0])
        return {"loss": loss_sum / len(x), "accuracy": correct / len(x), "auc": auc(np.concatenate(scores), y)}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random click > score of a random non-click), ties
    counted half (the Mann-Whitney U statistic over ranks)."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    start = 0
    for end in np.append(np.flatnonzero(np.diff(sorted_scores)) + 1, len(scores)):  # average rank of ties
        ranks[order[start:end]] = (start + end + 1) / 2.0
        start = end
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
