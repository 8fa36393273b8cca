"""`asyncps sample RUN_DIR`: draw text from a trained character-level language model."""
from __future__ import annotations

import argparse
from pathlib import Path

from asyncps.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("run_dir", help="a run directory of a charlm run (holds config.yaml and params.npz)")
    parser.add_argument("--temperature", type=float, default=0.6, help="softmax temperature (default 0.6)")
    parser.add_argument("--length", type=int, default=200, help="characters to draw")
    parser.add_argument("--prime", default="The ", help="text the sample continues")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from asyncps.runs import PARAMS_FILE, load_params
    from asyncps.config import load_config
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model
    from asyncps.worker.models.charlm import CharLM

    run_dir = Path(args.run_dir)
    if not (run_dir / PARAMS_FILE).is_file():
        raise UserError(f"{run_dir / PARAMS_FILE}: no trained parameters (train a charlm run first)")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.name != "charlm":
        raise UserError(f"{run_dir}: model.name is {cfg.model.name!r}; sampling needs a charlm run")
    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    model = build_model(cfg.model, data.meta)
    assert isinstance(model, CharLM)  # model.name is charlm (checked above)
    params = load_params(run_dir / PARAMS_FILE)
    rng = np.random.default_rng(args.seed)
    text = model.sample(params, rng, args.prime, args.length, temperature=args.temperature, vocab=data.meta.vocab)
    print(text)
    return 0
