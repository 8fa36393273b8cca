"""How a click log's columns become the int64 ids a CTR model reads (shared by the generator and
the Criteo TSV reader, so both feed the models the same way).

- A categorical value v of field f becomes ``splitmix64(splitmix64(v + 1) ^ key(f))``: the inner
  hash spreads v over 64 bits, so two fields' ids collide only by a 64-bit accident (XOR-ing v
  with a per-field key directly would not do: small values of two fields can share an XOR).
- A numeric count x of numeric field j (a Criteo integer column) becomes the id of its bucket
  ``floor(BUCKETS_PER_UNIT * log(1 + max(x, 0)))`` in field ``CATEGORICAL + j``, and a missing
  value its own bucket (-1). The customary log(1 + x) transform, bucketed, because the id-table
  interface hands a model only indices into the batch's unique ids (worker/tables.py), never a
  float column: a bucket's learned weight is a piecewise-constant function of log(1 + x), which
  contains the usual linear weight up to a quarter of a log unit (the Criteo winners bucketed
  the counts too).
"""
from __future__ import annotations

import numpy as np

from asyncps.hashing import MASK, splitmix64

CATEGORICAL = 26  # Criteo: C1..C26
NUMERIC = 13  # Criteo: I1..I13
BUCKETS_PER_UNIT = 4  # numeric buckets per unit of log(1 + x)
MAX_BUCKET = 63  # counts above e^16 share the last bucket
MISSING = -1  # the bucket of a missing numeric value
_FIELD_TAG = np.uint64(0xC7F1E1D5)  # keeps the field keys apart from every other use of splitmix64


def field_key(field: int) -> np.uint64:
    return splitmix64(np.uint64(field) ^ _FIELD_TAG)


def field_ids(field: int, values: np.ndarray) -> np.ndarray:
    """int64 ids of `values` (non-negative integers below 2**64 - 1) of field number `field`."""
    with np.errstate(over="ignore"):
        inner = splitmix64((np.asarray(values).astype(np.uint64) + np.uint64(1)) & MASK)
        return splitmix64(inner ^ field_key(field)).view(np.int64)


def numeric_buckets(counts: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each count's bucket of log(1 + max(count, 0)); `missing` (bool) ones get MISSING."""
    t = np.log1p(np.maximum(np.asarray(counts, dtype=np.float64), 0.0))
    buckets = np.minimum(np.floor(t * BUCKETS_PER_UNIT), MAX_BUCKET).astype(np.int64)
    return np.where(missing, MISSING, buckets)


def numeric_ids(j: int, buckets: np.ndarray, categorical: int = CATEGORICAL) -> np.ndarray:
    """int64 ids of numeric field j's buckets (field number `categorical` + j)."""
    return field_ids(categorical + j, np.asarray(buckets, dtype=np.int64) - MISSING)  # MISSING -> value 0
