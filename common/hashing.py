"""64-bit hashing for ids: SplitMix64's finalizer, vectorized over numpy (wrapping arithmetic).

Used where an id must be a pure function of its inputs on every process: hashed feature values
(worker/data/ctr.py) and the deterministic first values of an embedding-table row (ps/tables.py).
"""
from __future__ import annotations

import zlib
from typing import overload

import numpy as np

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@overload
def splitmix64(x: np.uint64) -> np.uint64: ...
@overload
def splitmix64(x: np.ndarray) -> np.ndarray: ...


def splitmix64(x: np.uint64 | np.ndarray) -> np.uint64 | np.ndarray:
    """SplitMix64's finalizer of each uint64 in `x` (Steele, Lea & Flood, OOPSLA 2014); a scalar
    (np.uint64) for a scalar, an array for an array."""
    with np.errstate(over="ignore"):
        x = (np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & MASK
        return x ^ (x >> np.uint64(31))


def name_key(name: str, seed: int = 0) -> np.uint64:
    """A 64-bit key for a name (a table, a feature field) under a seed."""
    return np.uint64((int(seed) * 0x100000001B3 + zlib.crc32(name.encode())) & 0xFFFFFFFFFFFFFFFF)


def feature_ids(field: str, values: np.ndarray) -> np.ndarray:
    """The int64 id of each value of a categorical feature `field` (a hashed feature)."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(values).astype(np.uint64) ^ name_key(field)).view(np.int64)
