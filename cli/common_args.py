"""Arguments every config-driven subcommand shares: CONFIG and key=value overrides."""
from __future__ import annotations

import argparse

from asyncps.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run's YAML file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override a config key, value typed as YAML (e.g. optimizer.learning_rate=0.05)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
