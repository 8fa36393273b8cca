"""What one shard reads of a run's Config, as a frozen value built once (`ShardSettings.from_config`).

The shard core (ps/shard.py) and what it owns (the consistency mode, the update rule, the id-keyed
tables of ps/table_service.py) read only these fields, not the whole Config: a shard's inputs are
listed here, and a later change to the Config cannot reach a running shard.

The consistency fields keep the names of `ClusterConfig` (mode, workers, staleness_bound,
backup_workers, softsync_n), so `make_consistency` (ps/consistency.py) builds a mode from either.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from asyncps.config import Config, OptimizerConfig
from asyncps.ps.history import history_depth


@dataclass(frozen=True)
class ShardSettings:
    """A shard's part of a Config (see the module docstring)."""

    workers: int  # cluster.workers: worker indexes are [0, workers)
    ps: int  # cluster.ps: restored table rows must be this shard's by hash among this many
    seed: int  # first values of table rows: a function of (seed, table, id)
    mode: str  # cluster.mode: the consistency mode (ps/consistency.py)
    staleness_bound: int  # ssp
    backup_workers: int  # sync
    softsync_n: int  # softsync
    optimizer: OptimizerConfig  # the update rule's section (a copy): optimizer, schedule, staleness policy
    staleness_policy: str  # optimizer.staleness_policy.name: tables train only with none
    controlled: bool  # staleness.controlled: tables train only without it
    history_depth: int  # versions kept for controlled staleness (ps/history.py), 0: none
    table_capacity: int | None  # rows per table on this shard (None: no limit)
    table_eviction: str  # lru or lfu
    frozen: tuple[str, ...]  # train.frozen patterns: variables never updated

    @classmethod
    def from_config(cls, cfg: Config) -> "ShardSettings":
        cluster = cfg.cluster
        return cls(
            workers=cluster.workers,
            ps=cluster.ps,
            seed=cfg.seed,
            mode=cluster.mode,
            staleness_bound=cluster.staleness_bound,
            backup_workers=cluster.backup_workers,
            softsync_n=cluster.softsync_n,
            optimizer=copy.deepcopy(cfg.optimizer),
            staleness_policy=cfg.optimizer.staleness_policy.name,
            controlled=bool(cfg.staleness.controlled),
            history_depth=history_depth(cfg.staleness),
            # (getattr: configs written before tables existed have neither field)
            table_capacity=getattr(cluster, "table_capacity", None),
            table_eviction=getattr(cluster, "table_eviction", "lru"),
            frozen=tuple(cfg.train.frozen),
        )
