"""The partitioner: deterministic, balanced, row splits that join back without losing rows."""
import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncps.protos.codec import SparseRows
from asyncps import partition
from asyncps.partition import Placement, PlacementError, place

specs_strategy = st.dictionaries(
    st.text("abcdefgh/", min_size=1, max_size=6),
    st.tuples(st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple), st.sampled_from(["float32", "float16", "int64"])),
    min_size=1,
    max_size=8,
)


def test_doctests():
    assert doctest.testmod(partition).failed == 0


@settings(max_examples=100, deadline=None)
@given(specs_strategy, st.integers(1, 5))
def test_placement_is_deterministic_and_covers_every_row(specs, shards):
    p = place(specs, shards, split_bytes=4096)
    shuffled = dict(reversed(list(specs.items())))
    assert place(shuffled, shards, split_bytes=4096) == p  # independent of dict order
    assert Placement.from_json(p.to_json()) == p
    for name, var in p.variables.items():
        rows = var.shape[0] if var.shape else 1
        assert var.blocks[0].start == 0 and var.blocks[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(var.blocks, var.blocks[1:]))
        assert len({b.shard for b in var.blocks}) == len(var.blocks)
        sizes = [b.stop - b.start for b in var.blocks]
        assert max(sizes) - min(sizes) <= 1  # near-equal blocks
    assert sum(p.shard_bytes()) == sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())


@settings(max_examples=60, deadline=None)
@given(specs_strategy, st.integers(1, 4))
def test_split_then_join_is_identity(specs, shards):
    p = place(specs, shards, split_bytes=2048)
    full = {n: np.arange(int(np.prod(s)), dtype=d).reshape(s) for n, (s, d) in specs.items()}
    pieces = p.split(full)
    for k in range(shards):
        assert {n: (a.shape, a.dtype.name) for n, a in pieces[k].items()} == p.shard_specs(k)
    joined = p.join(pieces)
    for n, a in full.items():
        np.testing.assert_array_equal(joined[n], a)


def test_small_variables_balance_bytes_largest_first():
    specs = {f"v{i}": ((s,), "float32") for i, s in enumerate([100, 90, 80, 70, 60, 50])}
    p = place(specs, 3)
    assert p.shard_bytes() == [4 * (100 + 50), 4 * (90 + 60), 4 * (80 + 70)]


def test_large_variable_is_split_across_all_shards():
    p = place({"emb": ((10_001, 64), "float32"), "b": ((4,), "float32")}, 3)
    assert [(b.shard, b.stop - b.start) for b in p.variables["emb"].blocks] == [(0, 3334), (1, 3334), (2, 3333)]
    assert p.variables["b"].blocks[0].shard == 2  # the least loaded shard


def test_sparse_rows_go_to_the_shard_holding_them_made_local():
    p = place({"emb": ((1000, 512), "float32")}, 2)
    g = SparseRows(np.array([3, 700, 499, 500]), np.arange(4 * 512, dtype=np.float32).reshape(4, 512))
    s0, s1 = p.split({"emb": g})
    np.testing.assert_array_equal(s0["emb"].rows, [3, 499])
    np.testing.assert_array_equal(s1["emb"].rows, [200, 0])
    np.testing.assert_array_equal(s1["emb"].values[0], g.values[1])
    only0 = p.split({"emb": SparseRows(np.array([1]), np.zeros((1, 512), np.float32))})
    assert "emb" not in only0[1]


def test_join_detects_lost_rows():
    p = place({"emb": ((1000, 512), "float32")}, 2)
    pieces = p.split({"emb": np.zeros((1000, 512), np.float32)})
    with pytest.raises(PlacementError, match=r"rows 500:1000 expected from shard 1 .* got nothing \(lost rows\?\)"):
        p.join([pieces[0], {}])
    with pytest.raises(PlacementError, match="got shape \\(499, 512\\)"):
        p.join([pieces[0], {"emb": pieces[1]["emb"][1:]}])
    with pytest.raises(PlacementError, match="lost some shards"):
        p.join([pieces[0]])
