"""The values a shard exchanges with its clients, one definition each for every role: a
`Snapshot` (a shard's whole state, for checkpoints and restores) and a `PushResult` (what the
shard did with a push). `SparseRows` lives in asyncps.sparse. The wire codec (protos/codec.py)
encodes these; the shard (ps/), its client and the chief use them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass
class Snapshot:
    """A shard's state at one version: values, optimizer slots and per-worker counters."""

    version: int
    values: dict[str, np.ndarray]
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> slot -> array
    updates: dict[str, int] = field(default_factory=dict)  # name -> updates applied to it
    last_seq: dict[int, int] = field(default_factory=dict)  # worker -> highest push seq seen
    clocks: dict[int, int] = field(default_factory=dict)  # worker -> pushes applied
    optimizer: str = ""


class PushResult(NamedTuple):
    """What the shard did with a push: APPLIED, ACCUMULATED, DROPPED or DUPLICATE (the names of
    PushReply.Result), the shard's version after it, and the push's staleness if applied."""

    result: str
    version: int
    staleness: int
