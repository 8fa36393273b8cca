"""The model's variables as the cluster sees them: initial values, trainable names, placement.

Every process (chief, workers) derives these from the config alone, with the same seed, so they
agree on names, shapes and which shard holds what without exchanging anything.
"""
from __future__ import annotations

import fnmatch

import numpy as np

from asyncps.config import Config


def trainable_names(names, frozen_patterns) -> list[str]:
    """Variables that no `frozen` fnmatch pattern matches, in a stable order."""
    return [n for n in sorted(names) if not any(fnmatch.fnmatchcase(n, p) for p in frozen_patterns)]


def initial_params(cfg: Config, model) -> dict[str, np.ndarray]:
    """The run's initial values: a function of the config's seed only."""
    return model.init_params(np.random.default_rng(cfg.seed))


def placement_for(params: dict[str, np.ndarray], num_shards: int):
    """Which shard holds which rows of which variable (asyncps.partition.place)."""
    from asyncps.partition import place  # the one partitioner; pure, no server state

    return place({n: (v.shape, v.dtype) for n, v in params.items()}, num_shards)
