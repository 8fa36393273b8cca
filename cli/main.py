"""The `asyncps` command: one console script, one subcommand per job.

Each subcommand lives in its own module and is imported only when used, so `asyncps --help`
stays fast and a role started in a container loads only what it needs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from asyncps.allocator import tune_allocator
from asyncps.errors import UserError
from asyncps.logs import configure as configure_logging

# subcommand -> (module under asyncps.cli, one-line help)
COMMANDS = {
    "train": ("train", "train in one process (the staleness-0 baseline)"),
    "launch": ("launch", "start parameter servers, workers and the chief on this machine"),
    "ps": ("roles", "run one parameter-server shard (for containers)"),
    "worker": ("roles", "run one worker (for containers)"),
    "chief": ("roles", "run the chief (for containers)"),
    "sample": ("sample", "draw text from a trained character-level language model"),
    "data": ("data", "download and verify data sets into the local cache"),
    "compose": ("compose", "render a docker-compose file that runs the config as a cluster"),
    "health": ("health", "exit 0 when a server's gRPC health service says SERVING"),
    "sweep": ("sweep", "run a grid of configs x seeds; results.csv, summary.md and plots"),
    "certs": ("certs", "make a CA and per-role TLS certificates for cluster.security"),
    "inspect": ("inspect", "show a checkpoint: step, versions, variables with shapes and norms, slots"),
    "eval": ("eval", "score a checkpoint on the test set with the worker's model code"),
    "replay": ("replay", "recompute a cluster run from its update log, bit for bit (or without staleness)"),
}


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command's parser and each subcommand's own."""
    parser = argparse.ArgumentParser(prog="asyncps", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"asyncps {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"asyncps.cli.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p, name)
        p.set_defaults(run=mod.run)
        subparsers[name] = p
    return parser, subparsers


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line; a subcommand's options may come anywhere after it (`launch CONFIG k=v
    --dry-run k=v`), which argparse allows only per subparser (parse_intermixed_args)."""
    parser, subparsers = _build_parsers()
    if argv and argv[0] in COMMANDS:
        args = subparsers[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def package_version() -> str:
    """The installed distribution's version (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncps")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def pin_blas_threads() -> None:
    """One BLAS thread per process: several numpy processes share few cores (10x faster)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


ROLE_COMMANDS = ("ps", "worker", "chief")


def main(argv: list[str] | None = None) -> int:
    pin_blas_threads()
    tune_allocator()  # freed step buffers stay in the process (common/allocator.py)
    args = parse(sys.argv[1:] if argv is None else list(argv))
    configure_logging(args.command in ROLE_COMMANDS)
    if args.command == "launch" and argv is None:  # the command itself, not a role forked from it
        from asyncps.cli.processes import allow_fork

        allow_fork()
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"asyncps {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asyncps {args.command}: interrupted", file=sys.stderr)
        return 130
