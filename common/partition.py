"""Which shard holds which variable (or which rows of it): one pure, deterministic function.

`place(specs, num_shards)` is computed by every process from the same variable specs and gives
the same answer everywhere; the checkpoint manifest records it (`Placement.to_json`).

Rules:
  * A variable of more than `split_bytes` bytes (default 1 MiB, `SPLIT_BYTES`) with at least two
    rows is split by rows (first dimension) into near-equal contiguous blocks, one per shard
    (block i on shard i; the first ``rows % shards`` blocks get one row more, as
    ``np.array_split``). 1 MiB keeps a 784x256 float32 layer (0.77 MiB) whole and splits
    embeddings and wide layers, so no single shard carries a large variable alone.
  * The other variables are placed greedily to balance bytes: largest first (ties by name), each
    on the shard with the fewest bytes so far (ties by lowest index), counting the blocks of the
    split variables.

On a shard a variable keeps its name; a split variable holds the block of rows
``start:stop`` and its shape there is ``(stop - start, *shape[1:])``. Sparse rows sent to a
shard are shard-local (global row - start).

>>> p = place({"emb": ((1000, 512), "float32"), "w": ((512, 10), "float32"), "b": ((10,), "float32")}, 2)
>>> p.variables["emb"].blocks
(Block(shard=0, start=0, stop=500), Block(shard=1, start=500, stop=1000))
>>> p.variables["w"].blocks, p.variables["b"].blocks
((Block(shard=0, start=0, stop=512),), (Block(shard=1, start=0, stop=10),))
>>> p.shard_specs(1)
{'b': ((10,), 'float32'), 'emb': ((500, 512), 'float32')}
>>> Placement.from_json(p.to_json()) == p
True

Id-keyed embedding tables (ps/tables.py) have no rows to cut: their ids are any 64-bit values.
An id's row lives on shard ``table_owners(ids, num_shards)``, a hash of the id alone (a
SplitMix64 finalizer of the id under a fixed salt, modulo the shard count), so every process
agrees without a table of ids, hot ids spread like cold ones, and a checkpoint restored into
another shard count re-places each row by the same function.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncps.hashing import splitmix64
from asyncps.sparse import SparseRows

SPLIT_BYTES = 1 << 20  # variables larger than this are split by rows across the shards


class PlacementError(ValueError):
    """Pieces that do not fit a placement: a missing shard block, lost rows, a wrong shape."""


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of a variable, held by `shard` (a whole variable: 0:rows)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class VarPlacement:
    """Where one variable lives: its full shape and dtype, and its blocks in row order."""

    shape: tuple[int, ...]
    dtype: str
    blocks: tuple[Block, ...]

    @property
    def split(self) -> bool:
        """True when the variable is cut by rows across several shards."""
        return len(self.blocks) > 1

    def local_shape(self, block: Block) -> tuple[int, ...]:
        """Shape of the part of the variable that `block` holds."""
        return self.shape if not self.split else (block.stop - block.start, *self.shape[1:])


@dataclass(frozen=True)
class Placement:
    """The result of `place`: variables by name (sorted), each with its blocks."""

    num_shards: int
    variables: dict[str, VarPlacement]
    split_bytes: int = SPLIT_BYTES

    def shard_specs(self, shard: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{name: (shape on this shard, dtype)} of the variables (or blocks) on `shard`."""
        return {
            name: (var.local_shape(b), var.dtype)
            for name, var in self.variables.items()
            for b in var.blocks
            if b.shard == shard
        }

    def shard_bytes(self) -> list[int]:
        """Bytes held by each shard."""
        loads = [0] * self.num_shards
        for var in self.variables.values():
            itemsize = np.dtype(var.dtype).itemsize
            for b in var.blocks:
                loads[b.shard] += math.prod(var.local_shape(b)) * itemsize
        return loads

    def to_json(self) -> str:
        """A JSON text that `from_json` turns back into an equal Placement."""
        variables = {
            name: {"shape": list(v.shape), "dtype": v.dtype, "blocks": [[b.shard, b.start, b.stop] for b in v.blocks]}
            for name, v in self.variables.items()
        }
        return json.dumps({"num_shards": self.num_shards, "split_bytes": self.split_bytes, "variables": variables})

    @classmethod
    def from_json(cls, text: str) -> Placement:
        """The Placement written by `to_json`."""
        raw = json.loads(text)
        variables = {
            name: VarPlacement(tuple(v["shape"]), v["dtype"], tuple(Block(*b) for b in v["blocks"]))
            for name, v in raw["variables"].items()
        }
        return cls(raw["num_shards"], variables, raw["split_bytes"])

    def split(self, tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Cuts full arrays (or SparseRows with global rows) into one dict per shard.

        A dense split variable gives each shard a view of its rows (no copy); SparseRows give
        each shard the rows in its block, made shard-local; a shard with none of them gets
        nothing for that variable.
        """
        out: list[dict[str, Any]] = [{} for _ in range(self.num_shards)]
        for name, value in tensors.items():
            var = self._var(name)
            for block in var.blocks:
                piece = _cut(var, block, value)
                if piece is not None:
                    out[block.shard][name] = piece
        return out

    def join(self, pieces: Sequence[Mapping[str, np.ndarray]], names=None) -> dict[str, np.ndarray]:
        """Full arrays from the per-shard pieces of dense values (the inverse of `split`).

        Checks, like ps-lite's slicer on merge, that every block of every variable came back
        with the rows it should have; raises PlacementError naming what was lost.
        """
        if len(pieces) != self.num_shards:
            raise PlacementError(f"expected pieces from {self.num_shards} shards, got {len(pieces)} (lost some shards?)")
        names = list(self.variables) if names is None else names
        return {name: self._join_one(name, pieces) for name in names}

    def _join_one(self, name: str, pieces) -> np.ndarray:
        var = self._var(name)
        parts = []
        for block in var.blocks:
            part = pieces[block.shard].get(name)
            want = var.local_shape(block)
            if part is None or tuple(part.shape) != want:
                got = "nothing" if part is None else f"shape {tuple(part.shape)}"
                raise PlacementError(
                    f"variable {name!r}: rows {block.start}:{block.stop} expected from shard {block.shard} "
                    f"with shape {want}, got {got} (lost rows?)"
                )
            parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _var(self, name: str) -> VarPlacement:
        try:
            return self.variables[name]
        except KeyError:
            raise PlacementError(f"variable {name!r} is not in the placement") from None


def _cut(var: VarPlacement, block: Block, value):
    """The part of a full dense array or global SparseRows that `block` holds (None: nothing)."""
    if isinstance(value, SparseRows):
        if not var.split:
            return value
        rows = np.asarray(value.rows)
        mask = (rows >= block.start) & (rows < block.stop)
        if not mask.any():
            return None
        return SparseRows(rows[mask] - block.start, np.asarray(value.values)[mask])
    return value if not var.split else value[block.start : block.stop]


def place(
    specs: Mapping[str, tuple[Any, Any]], num_shards: int, split_bytes: int = SPLIT_BYTES
) -> Placement:
    """Places variables ``{name: (shape, dtype)}`` on `num_shards` shards (see the module doc).

    Pure and deterministic: the result depends only on the arguments, not on dict order.

    >>> p = place({"a": ((3,), "float32"), "b": ((2,), "float32"), "c": ((2,), "float32")}, 2)
    >>> {n: v.blocks[0].shard for n, v in p.variables.items()}
    {'a': 0, 'b': 1, 'c': 1}
    >>> p.shard_bytes()
    [12, 16]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    norm = {name: (tuple(int(d) for d in shape), np.dtype(dtype).name) for name, (shape, dtype) in specs.items()}
    nbytes = {name: math.prod(shape) * np.dtype(dtype).itemsize for name, (shape, dtype) in norm.items()}
    loads = [0] * num_shards
    blocks: dict[str, tuple[Block, ...]] = {}
    for name in sorted(norm):
        shape, _ = norm[name]
        if num_shards > 1 and nbytes[name] > split_bytes and len(shape) >= 1 and shape[0] >= 2:
            blocks[name] = _split_rows(shape[0], nbytes[name], loads)
    for name in sorted(set(norm) - set(blocks), key=lambda n: (-nbytes[n], n)):
        shard = min(range(num_shards), key=lambda k: (loads[k], k))
        loads[shard] += nbytes[name]
        shape = norm[name][0]
        blocks[name] = (Block(shard, 0, shape[0] if shape else 1),)
    variables = {name: VarPlacement(norm[name][0], norm[name][1], blocks[name]) for name in sorted(norm)}
    return Placement(num_shards, variables, split_bytes)


def _split_rows(rows: int, nbytes: int, loads: list[int]) -> tuple[Block, ...]:
    """Near-equal row blocks on the shards (the least loaded ones when rows < shards)."""
    n = min(len(loads), rows)
    shards = sorted(sorted(range(len(loads)), key=lambda k: (loads[k], k))[:n])
    bounds = np.cumsum([0] + [rows // n + (i < rows % n) for i in range(n)])
    out = []
    for shard, start, stop in zip(shards, bounds[:-1], bounds[1:]):
        loads[shard] += nbytes * int(stop - start) // rows
        out.append(Block(shard, int(start), int(stop)))
    return tuple(out)


_TABLE_SALT = np.uint64(0x7AB1E5EED0C0FFEE)  # not the rows' init salt: placement and values independent


def table_owners(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard (int64 in [0, num_shards)) that holds each id's row of an id-keyed table.

    >>> table_owners(np.array([1, 2, 3, 1]), 2).tolist() == table_owners(np.array([1, 2, 3, 1]), 2).tolist()
    True
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards == 1:
        return np.zeros(len(ids), np.int64)
    mixed = splitmix64(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ _TABLE_SALT)
    return (mixed % np.uint64(num_shards)).astype(np.int64)


def split_ids(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Per shard, the positions in `ids` of the ids it owns (in order): ``ids[pos[i]]`` go to
    shard i, and rows answered in that order go back to ``out[pos[i]]``."""
    owners = table_owners(ids, num_shards)
    return [np.flatnonzero(owners == i) for i in range(num_shards)]
