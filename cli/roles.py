"""`asyncps ps|worker|chief CONFIG`: one role alone, as the launcher, compose or TFJob start it.

Where everyone is comes from TF_CONFIG (read here, once) or, without it, from the YAML's
`cluster` section (fixed ports required then).
"""
from __future__ import annotations

import argparse
import os

from asyncps.cli.common_args import add_config_arguments, config_from_args
from asyncps.cluster import ClusterSpec, bind_host, parse_tf_config
from asyncps.config import Config
from asyncps.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_arguments(parser)
    if name == "ps":
        parser.add_argument("--index", type=int, default=None, help="shard index (default: TF_CONFIG's task.index)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    spec = cluster_from_environment(cfg, os.environ.get("TF_CONFIG"))
    if args.command == "ps":
        from asyncps.ps.server import serve

        index = args.index if args.index is not None else spec.task_index or 0
        if not 0 <= index < len(spec.ps):
            raise ConfigError(f"shard index {index} is outside the cluster's {len(spec.ps)} shards")
        host, port = spec.ps[index].rsplit(":", 1)
        return serve(cfg, index=index, host=bind_host(host), port=int(port)) or 0
    if args.command == "chief":
        from asyncps.chief.main import run_chief

        return run_chief(cfg, spec)
    from asyncps.worker.main import run_worker

    return run_worker(cfg, spec)


def cluster_from_environment(cfg: Config, tf_config: str | None) -> ClusterSpec:
    """TF_CONFIG when set, else the YAML's fixed addresses."""
    if tf_config:
        return parse_tf_config(tf_config, cfg.cluster.workers)
    c = cfg.cluster
    if not c.ps_ports or not c.chief_port:
        raise ConfigError("no TF_CONFIG in the environment and cluster.ps_ports / cluster.chief_port are not set")
    return ClusterSpec(chief=f"{c.host}:{c.chief_port}", ps=tuple(f"{c.host}:{p}" for p in c.ps_ports),
                       workers=c.workers)

