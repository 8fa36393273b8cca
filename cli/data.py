"""`asyncps data mnist`: fetch, verify and cache a data set ahead of a run."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("dataset", choices=["mnist"], help="which data set to prepare")
    parser.add_argument("--cache-dir", default=None, help="where the verified .npz is kept (default ~/.cache/asyncps)")


def run(args: argparse.Namespace) -> int:
    from asyncps.worker.data.mnist import prepare_mnist

    path = prepare_mnist(args.cache_dir)
    print(f"mnist ready: {path}")
    return 0
