"""The Criteo display-advertising TSV format, streamed into feature ids (data.name criteo).

Each line: the label (0 or 1), 13 integer columns (I1..I13, counts; Criteo's I2 can be
negative), 26 categorical columns (C1..C26, 32-bit hashes in hex), tab-separated; an empty
column is a missing value. A line becomes 39 int64 ids (worker/data/click_features.py): C_k's
value hashed with its field (a missing C_k is its own value), I_j's log(1 + x) bucket (a
missing I_j its own bucket), the same ids the click-log generator makes, so ctr_lr and ctr_deep
read both alike.

Streaming: lines are read and parsed CHUNK at a time into int64 arrays, so memory is the parsed
examples (312 bytes each) plus one chunk, never the text. The held-out set is `test_path`, or
else the lines whose number hashes below `test_fraction` (deterministic from the seed, whatever
the file's size). A malformed line is one DataError naming the file and the line. `.gz` files
are read through gzip.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from asyncps.errors import DataError
from asyncps.hashing import splitmix64
from asyncps.worker.data.click_features import CATEGORICAL, NUMERIC, field_ids, numeric_buckets, numeric_ids

COLUMNS = 1 + NUMERIC + CATEGORICAL
CHUNK = 8192  # lines parsed at a time (as split Python strings, ~2.5 KB a line: ~20 MB)
_SPLIT_TAG = 0x5E1EC7  # keeps the held-out hash apart from the generator's streams


def load_criteo(path, test_path=None, test_fraction: float = 0.1, seed: int = 0, chunk: int = CHUNK):
    """(x_train (n, 39) int64 ids, y_train (n,) int64, x_test, y_test) from Criteo TSV file(s)."""
    if test_path is not None:
        x_train, y_train, _ = read_criteo(path, chunk=chunk)
        x_test, y_test, _ = read_criteo(test_path, chunk=chunk)
    else:
        x, y, line_numbers = read_criteo(path, chunk=chunk)
        held_out = held_out_lines(line_numbers, test_fraction, seed)
        x_train, y_train, x_test, y_test = x[~held_out], y[~held_out], x[held_out], y[held_out]
    for name, part in (("training", y_train), ("held-out", y_test)):
        if not len(part):
            where = test_path if name == "held-out" and test_path is not None else path
            raise DataError(f"data {where}: no {name} examples (lines: {len(y_train) + len(y_test)}; "
                            f"data.test_fraction {test_fraction})")
    return x_train, y_train, x_test, y_test


def held_out_lines(line_numbers: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the lines (1-based numbers) in the held-out set: a hash of (seed, number) below
    `fraction` of 2**64."""
    with np.errstate(over="ignore"):
        h = splitmix64(np.asarray(line_numbers, np.uint64) ^ splitmix64(np.uint64(seed) + np.uint64(_SPLIT_TAG)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


def read_criteo(path, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n, 39), labels (n,), 1-based line numbers (n,)) of every non-blank line of `path`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data {path}: no such file (a Criteo TSV file: label, 13 integers, 26 hex categoricals)")
    xs: list[np.ndarray] = []  # per chunk: ids, labels, line numbers
    ys: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as f:
            rows: list[tuple[int, list[str]]] = []
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                rows.append((number, line.split("\t")))
                if len(rows) == chunk:
                    _parse_into(rows, path, xs, ys, numbers)
                    rows = []
            if rows:
                _parse_into(rows, path, xs, ys, numbers)
    except (UnicodeDecodeError, OSError, EOFError) as e:  # a binary or truncated (.gz) file
        raise DataError(f"data {path}: not a readable Criteo TSV file ({type(e).__name__}: {e})") from None
    if not xs:
        raise DataError(f"data {path}: no examples (empty file)")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(numbers)


def _parse_into(rows, path: Path, xs: list, ys: list, numbers: list) -> None:
    """Parse one chunk of split lines into ids and labels, appended to the lists."""
    n = len(rows)
    labels = np.empty(n, np.int64)
    counts = np.zeros((n, NUMERIC), np.float64)
    missing = np.zeros((n, NUMERIC), bool)
    values = np.zeros((n, CATEGORICAL), np.uint64)  # 0: missing, else the hex value + 1
    for i, (number, cols) in enumerate(rows):
        if len(cols) != COLUMNS:
            raise DataError(f"{path}:{number}: expected {COLUMNS} tab-separated columns (label, {NUMERIC} integers, "
                            f"{CATEGORICAL} hex categoricals), got {len(cols)}")
        if cols[0] not in ("0", "1"):
            raise DataError(f"{path}:{number}: the label (column 1) must be 0 or 1, got {cols[0][:40]!r}")
        labels[i] = cols[0] == "1"
        for j in range(NUMERIC):
            s = cols[1 + j]
            if not s:
                missing[i, j] = True
                continue
            try:
                counts[i, j] = int(s)
            except ValueError:
                raise DataError(f"{path}:{number}: column {2 + j} (I{1 + j}) must be an integer or empty, "
                                f"got {s[:40]!r}") from None
        for k in range(CATEGORICAL):
            s = cols[1 + NUMERIC + k]
            if not s:
                continue
            try:
                v = int(s, 16)
            except ValueError:
                v = -1
            if not 0 <= v < (1 << 64) - 1 or not s.isalnum():
                raise DataError(f"{path}:{number}: column {2 + NUMERIC + k} (C{1 + k}) must be a hex hash or empty, "
                                f"got {s[:40]!r}")
            values[i, k] = v + 1
    x = np.empty((n, CATEGORICAL + NUMERIC), np.int64)
    for k in range(CATEGORICAL):
        x[:, k] = field_ids(k, values[:, k])
    buckets = numeric_buckets(counts, missing)
    for j in range(NUMERIC):
        x[:, CATEGORICAL + j] = numeric_ids(j, buckets[:, j])
    xs.append(x)
    ys.append(labels)
    numbers.append(np.fromiter((number for number, _ in rows), np.int64, n))
