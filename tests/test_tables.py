"""Embedding tables keyed by 64-bit ids (ps/tables.py): deterministic rows made on first touch,
row-wise pull and push, per-row versions and staleness by row frequency, capacity and eviction,
and the same training as a dense variable where the optimizer leaves untouched rows alone."""
import numpy as np
import pytest

from asyncps.config import OptimizerConfig
from asyncps.ps.errors import InvalidArgument
from asyncps.ps.optim.optimizers import make_optimizer
from asyncps.ps.tables import EmbeddingTable, IdIndex, frequency_bucket, initial_rows

BIG = np.array([2**63 - 1, -(2**63), 0, 123456789012345], np.int64)


def table(name="t", dim=4, optimizer="sgd", **kw) -> EmbeddingTable:
    return EmbeddingTable(name, dim, seed=7, optimizer=make_optimizer(OptimizerConfig(name=optimizer)), **kw)


def held(t: EmbeddingTable, ids) -> list[bool]:
    """Whether the table has a row for each id (nothing created or touched)."""
    return (t.index.find(np.asarray(ids, np.int64), t.ids) >= 0).tolist()


def test_rows_are_a_pure_function_of_seed_table_and_id():
    a, b = table(), table()
    va, _ = a.pull(BIG)
    vb, _ = b.pull(BIG[::-1])  # another order, another store: the same rows
    np.testing.assert_array_equal(va, vb[::-1])
    np.testing.assert_array_equal(va, initial_rows(7, "t", BIG, 4, 0.05))
    assert np.abs(va).max() <= 0.05 and len(np.unique(va)) == va.size
    assert not np.array_equal(va, table(name="u").pull(BIG)[0])  # another table, other rows


def test_push_updates_only_its_rows_and_records_per_row_staleness():
    t = table()
    ids = np.array([5, 9, 11], np.int64)
    before, versions = t.pull(ids)
    assert versions.tolist() == [0, 0, 0] and t.rows == 3
    t.push(np.array([5, 5, 9]), np.ones((3, 4), np.float32), np.zeros(3, np.int64), lr=0.5)  # 5 twice: summed
    after, versions = t.pull(ids)
    np.testing.assert_allclose(after[0], before[0] - 0.5 * 2)
    np.testing.assert_allclose(after[1], before[1] - 0.5)
    np.testing.assert_array_equal(after[2], before[2])
    assert versions.tolist() == [1, 1, 0]
    staleness = t.push(np.array([5, 11]), np.ones((2, 4), np.float32), np.array([0, 0]), lr=0.5)
    assert staleness.tolist() == [1, 0]  # row 5 was updated once since it was read at version 0
    assert t.stats()["staleness_by_frequency"] == {0: {0: 3, 1: 1}}


@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl"])
def test_a_table_trains_like_a_dense_variable_of_the_same_rows(name):
    """Row-wise pushes equal dense updates with zero gradients elsewhere, bit for bit (FTRL: once
    every row has been updated, since its weights are a function of its slots)."""
    rng = np.random.default_rng(0)
    vocab, dim = 8, 3
    t = table(dim=dim, optimizer=name)
    dense = initial_rows(7, "t", np.arange(vocab, dtype=np.int64), dim, 0.05)
    opt = make_optimizer(OptimizerConfig(name=name))
    slots = opt.init_slots(dense)
    t.pull(np.arange(vocab))
    steps = [np.arange(vocab)] if name == "ftrl" else []
    steps += [rng.choice(vocab, size=3, replace=False) for _ in range(6)]
    for step, ids in enumerate(steps):
        g = rng.standard_normal((len(ids), dim)).astype(np.float32)
        t.push(ids, g, t.pull(ids)[1], lr=0.1)
        full = np.zeros_like(dense)
        full[ids] = g
        opt.apply_dense(dense, full, slots, 0.1, step)
    np.testing.assert_array_equal(t.pull(np.arange(vocab))[0], dense)


@pytest.mark.parametrize("eviction, evicted", [("lru", 1), ("lfu", 2)])
def test_capacity_evicts_the_least_recently_or_frequently_used_row(eviction, evicted):
    t = table(capacity=3, eviction=eviction)
    t.pull(np.array([1, 2, 3]))
    t.push(np.array([1]), np.ones((1, 4), np.float32), np.array([0]), lr=0.1)  # 1: updated, not recent
    t.pull(np.array([2]))
    t.pull(np.array([3]))
    t.push(np.array([3]), np.ones((1, 4), np.float32), np.array([0]), lr=0.1)
    t.pull(np.array([4]))  # a fourth row: one must go
    assert t.rows == 3 and t.evicted == 1 and held(t, [evicted, 4]) == [False, True]
    row, version = t.pull(np.array([evicted]))  # it comes back new: initial values, version 0
    np.testing.assert_array_equal(row, initial_rows(7, "t", np.array([evicted]), 4, 0.05))
    assert version.tolist() == [0] and t.evicted == 2


def test_bad_pushes_are_refused_and_change_nothing():
    t = table()
    values, _ = t.pull(np.array([1, 2]))
    with pytest.raises(InvalidArgument, match="gradients of shape"):
        t.push(np.array([1, 2]), np.ones((2, 5), np.float32), np.zeros(2, np.int64), lr=0.1)
    with pytest.raises(InvalidArgument, match="non-finite"):
        t.push(np.array([1, 2]), np.full((2, 4), np.nan, np.float32), np.zeros(2, np.int64), lr=0.1)
    np.testing.assert_array_equal(t.pull(np.array([1, 2]))[0], values)


def test_a_read_version_ahead_of_its_row_counts_as_rewound():
    """Evicted and made again, or restored, since the read: staleness 0, counted as rewound."""
    t = table()
    t.pull(np.array([1]))
    assert t.push(np.array([1]), np.ones((1, 4), np.float32), np.array([3]), lr=0.1).tolist() == [0]
    assert t.rewound == 1 and t.versions[t.index.find(np.array([1]), t.ids)[0]] == 1


def test_frequency_buckets_are_powers_of_two():
    assert frequency_bucket(np.array([0, 1, 2, 3, 4, 7, 8, 1 << 40])).tolist() == [0, 0, 1, 1, 2, 2, 3, 15]


def test_a_restore_larger_than_the_capacity_keeps_the_last_rows():
    t = table(capacity=4)
    ids = np.arange(10, dtype=np.int64)
    t.load(ids, np.arange(10), np.ones((10, 4), np.float32), {k: np.zeros((10, 4), np.float32) for k in t.slots})
    assert t.rows == 4 and t.evicted == 6


def test_the_id_index_finds_every_id_through_collisions_deletions_and_rebuilds():
    """ps/tables.py IdIndex against a dict: extreme ids, duplicates in a query, a deleted slot
    probed past and reused, and rebuilds as it fills (from 16 slots: many collisions)."""
    rng = np.random.default_rng(3)
    keys = np.concatenate([BIG, rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)])
    index, truth = IdIndex(1), {}
    for a in range(0, 2000, 250):  # rows 0..1999 in batches: several rebuilds
        index.insert(keys[a:a + 250], np.arange(a, a + 250), keys)
        truth.update((int(keys[r]), r) for r in range(a, a + 250))
    gone = keys[:1000:3]
    index.delete(gone, keys)
    for i in gone.tolist():
        del truth[i]
    index.insert(keys[2000:2400], np.arange(2000, 2400), keys)  # may reuse the deleted slots
    truth.update((int(keys[r]), r) for r in range(2000, 2400))
    query = rng.choice(keys, 5000)  # duplicates, ids never inserted, deleted ones
    assert index.find(query, keys).tolist() == [truth.get(i, -1) for i in query.tolist()]
    assert len(index) == len(truth) and sorted(index.rows().tolist()) == sorted(truth.values())


def test_a_table_is_numpy_arrays_only_and_counts_them_exactly():
    """No Python object per row (the id index is an int32 array): 100,000 rows of width 1 with
    lazy Adam's three slots hold 32 bytes of row data each, plus storage reserve and index."""
    t = table(dim=1, optimizer="lazy_adam")
    ids = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 100_000, dtype=np.int64)
    t.pull(ids)
    arrays = [t.values, t.versions, t.ids, t.last_used, t.born, t.index.slots, *t.slots.values()]
    assert t.rows == 100_000 and t.nbytes == sum(a.nbytes for a in arrays)
    assert t.nbytes / t.rows < 32 * 1.5 + 4 / 0.35  # reserve at most half again; index load >= 0.35


def test_a_call_beyond_the_capacity_is_refused_before_anything_changes():
    t = table(capacity=3)
    t.pull(np.array([1, 2]))
    with pytest.raises(InvalidArgument, match="more ids than its capacity"):
        t.pull(np.array([1, 3, 4, 5]))  # 4 rows at once, 3 at most
    assert t.rows == 2 and t.evicted == 0 and held(t, [1, 2, 3, 5]) == [True, True, False, False]
