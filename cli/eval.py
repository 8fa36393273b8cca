"""`asyncps eval CKPT [--json]`: score a checkpoint on the test set with the worker's model code.

The model and data are built from the config saved in the checkpoint's manifest (overrides such
as `data.cache_dir=...` may follow), so a checkpoint is scored the way its run scored itself.
"""
from __future__ import annotations

import argparse
import json

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
    return model.evaluate(values, data.x_test, data.y_test)
