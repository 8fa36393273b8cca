"""`asyncps eval CKPT [--json]`: score a checkpoint on the test set with the worker's model code.

The model and data are built from the config saved in the checkpoint's manifest (overrides such
as `data.cache_dir=...` may follow), so a checkpoint is scored the way its run scored itself.
A model's id-keyed tables (ctr, ctr_lr, ctr_deep) are read from the checkpoint's table files; an
id the checkpoint has no row for gets the first values a shard would give it.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from asyncps.cli.inspect import open_checkpoint


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a ckpt-* folder, a checkpoints folder or a run directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a key of the saved config")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    checkpoint = open_checkpoint(args.checkpoint)
    metrics = evaluate(checkpoint, args.overrides)
    if args.json:
        print(json.dumps({"path": str(checkpoint.path), "step": checkpoint.step, **metrics}))
    else:
        print(f"{checkpoint.path} step {checkpoint.step}: " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return 0


def evaluate(checkpoint, overrides=()) -> dict:
    """The model's test metrics with the checkpoint's weights."""
    from asyncps.config import apply_override, from_dict
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model

    raw = dict(checkpoint.manifest["config"])
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw, source=f"{checkpoint.path}/manifest.json")
    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    model = build_model(cfg.model, data.meta)
    values, _, _ = checkpoint.full_state()
    tables = {t["name"]: SavedRows(checkpoint, t, cfg.seed) for t in (checkpoint.tables or [])}
    return model.evaluate({**values, **tables}, data.x_test, data.y_test)


class SavedRows:
    """A checkpoint's table as evaluation reads it (`worker.tables.RowSource`): the saved rows,
    sorted by id, and for unsaved ids their deterministic first values (ps/tables.py). Holds the
    table's ids and values (not its slots) in memory."""

    def __init__(self, checkpoint, table: dict, seed: int):
        import inspect

        from asyncps.ps.tables import EmbeddingTable

        self.name, self.dim, self.seed = table["name"], int(table["dim"]), seed
        self.scale = inspect.signature(EmbeddingTable).parameters["init_scale"].default  # what the shards use
        ids, values = [np.zeros(0, np.int64)], [np.zeros((0, self.dim), np.float32)]
        for part in table["parts"]:
            for file in part["files"]:
                with np.load(checkpoint.path / file, allow_pickle=False) as z:
                    ids.append(z["ids"])
                    values.append(z["values"])
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        self.ids, self.values = all_ids[order], np.concatenate(values)[order]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        from asyncps.ps.tables import initial_rows

        ids = np.asarray(ids, dtype=np.int64)
        out = initial_rows(self.seed, self.name, ids, self.dim, self.scale)
        at = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        known = (self.ids[at] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        out[known] = self.values[at[known]]
        return out
