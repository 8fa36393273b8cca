"""Click-log data: the generator with a planted model (worker/data/click_logs.py), the Criteo TSV
reader (worker/data/criteo.py), their shared feature ids, and the metrics that score them."""
import gzip
import math
import tracemalloc

import numpy as np
import pytest

from asyncps.config import load_config
from asyncps.errors import DataError
from asyncps.worker.data import BatchStream, load_dataset
from asyncps.worker.data.click_features import field_ids, numeric_buckets, numeric_ids
from asyncps.worker.data.click_logs import ClickLogSpec, generate, zipf_ranks
from asyncps.worker.data.criteo import load_criteo, read_criteo
from asyncps.worker.models.metrics import auc, log_loss, log_loss_of_logits
from cli_runner import CONFIGS

SMALL = ClickLogSpec(fields=6, numeric=3, vocab=1000)


def test_generator_is_deterministic_from_the_seed_and_splits_are_independent_streams():
    a, b = generate(SMALL, 3000, seed=5, split="train"), generate(SMALL, 3000, seed=5, split="train")
    for u, v in ((a.x, b.x), (a.y, b.y), (a.p, b.p)):
        np.testing.assert_array_equal(u, v)
    other = generate(SMALL, 3000, seed=6, split="train")
    test = generate(SMALL, 3000, seed=5, split="test")
    assert not np.array_equal(a.y, other.y) and not np.array_equal(a.x, test.x)
    assert a.x.dtype == np.int64 and a.x.shape == (3000, 9) and set(np.unique(a.y)) == {0, 1}
    # labels follow the planted probabilities: the click rate is their mean within sampling error
    assert abs(a.y.mean() - a.p.mean()) < 4 * math.sqrt(0.25 / 3000)


def test_fields_never_share_an_id_and_vocabularies_shrink_geometrically():
    vocabs = ClickLogSpec().vocabularies()
    assert len(vocabs) == 26 and vocabs[0] == 10**8 and vocabs[-1] == 4 and (np.diff(vocabs) < 0).all()
    values = np.arange(5000)
    ids = [set(field_ids(f, values).tolist()) for f in range(39)]
    assert sum(len(s) for s in ids) == len(set().union(*ids)) == 39 * 5000
    x = generate(SMALL, 2000, seed=0, split="train").x
    columns = [set(x[:, f].tolist()) for f in range(x.shape[1])]
    assert sum(len(c) for c in columns) == len(set().union(*columns))


def test_zipf_ranks_follow_the_power_law():
    rng = np.random.default_rng(0)
    ranks = zipf_ranks(rng, 200_000, 10**8, 1.1)
    assert ranks.min() >= 1 and ranks.max() <= 10**8
    counts = np.bincount(ranks[ranks <= 8])
    # p(r) ~ r^-1.1 (the continuous law floored: rank r covers [r, r + 1))
    expected = (np.arange(1, 9) ** -0.1 - np.arange(2, 10) ** -0.1) / (1 - (10**8 + 1) ** -0.1)
    np.testing.assert_allclose(counts[1:] / 200_000, expected, rtol=0.05)


def test_a_vocabulary_of_10_8_allocates_nothing_vocabulary_sized():
    def peak(vocab):
        tracemalloc.start()
        generate(ClickLogSpec(vocab=vocab), 2000, seed=0, split="train")
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    small, huge = peak(100), peak(10**8)
    assert huge < 4 * 2**20 and huge < 1.5 * small + 2**20  # ~0.6 MB of output either way, not 10^8 weights


def test_loaded_click_logs_carry_the_planted_metrics_and_shard_across_workers():
    cfg = load_config(CONFIGS / "ctr_lr.yaml", ["data.num_train=4000", "data.num_test=3000", "data.vocab=1000"])
    data = load_dataset(cfg.data, seed=cfg.seed)
    assert data.x_train.shape == (4000, 39) and data.meta.num_classes == 2 and data.meta.input_shape == (39,)
    ref = data.reference
    assert set(ref) == {"loss", "auc"} and 0.3 < ref["loss"] < 0.69 and 0.6 < ref["auc"] < 1
    # the worker's sharding sees plain arrays: disjoint parts covering the training set
    parts = [BatchStream(len(data.x_train), 100, w, 2, seed=0).shard for w in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 4000


def test_planted_model_is_the_best_a_learner_gets_near():
    """The planted probabilities beat every fitted model on held-out data, and logistic
    regression fitted on plenty of data over a small vocabulary comes within 0.01 of them."""
    spec = ClickLogSpec(fields=3, numeric=1, vocab=20, numeric_std=0.5)
    train, test = generate(spec, 60_000, 1, "train"), generate(spec, 20_000, 1, "test")
    ids = np.unique(train.x)
    def onehot(x):
        out = np.zeros((len(x), len(ids)))
        cols = np.searchsorted(ids, x)
        known = ids[np.minimum(cols, len(ids) - 1)] == x
        rows = np.repeat(np.arange(len(x)), x.shape[1])
        out[rows[known.ravel()], cols.ravel()[known.ravel()]] = 1
        return out
    a, b = onehot(train.x), onehot(test.x)
    w = np.zeros(len(ids))
    for _ in range(300):  # Newton steps would be exact; plain full-batch gradient descent suffices
        p = 1 / (1 + np.exp(-(a @ w)))
        w -= 2.0 * a.T @ (p - train.y) / len(a)
    fitted = log_loss_of_logits(b @ w, test.y)
    planted = log_loss(test.p, test.y)
    assert planted < fitted < planted + 0.01


def _criteo_line(label, ints, cats):
    return "\t".join([str(label)] + ["" if v is None else str(v) for v in ints] + ["" if c is None else c for c in cats])


def _write(path, lines, gz=False):
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_criteo_reader_hashes_fields_buckets_counts_and_keeps_missing_values(tmp_path):
    ints = [1, None, 0, 7, -2, 100, 3, None, 5, 0, 1, 2, 3000]
    cats = ["68fd1e64", None] + [f"{k:08x}" for k in range(24)]
    path = _write(tmp_path / "day.txt", [_criteo_line(1, ints, cats), _criteo_line(0, [None] * 13, [None] * 26)])
    x, y, lines = read_criteo(path, chunk=1)  # one line per chunk: the streaming path
    assert y.tolist() == [1, 0] and lines.tolist() == [1, 2] and x.shape == (2, 39)
    assert x[0, 0] == field_ids(0, np.array([0x68FD1E64 + 1]))[0]
    assert x[0, 1] == x[1, 1] == field_ids(1, np.array([0]))[0]  # a missing categorical: its own value
    missing = np.array([v is None for v in ints])
    buckets = numeric_buckets(np.array([0 if v is None else v for v in ints]), missing)
    assert buckets.tolist()[:6] == [2, -1, 0, 8, 0, 18]  # floor(4 log(1 + x)); a negative count is 0
    for j in range(13):
        assert x[0, 26 + j] == numeric_ids(j, buckets[j:j + 1])[0]
        assert x[1, 26 + j] == numeric_ids(j, np.array([-1]))[0]
    assert len(set(x[1].tolist())) == 39  # every field's "missing" is its own id


@pytest.mark.parametrize("line, what", [
    ("1\t2\t3", "expected 40 tab-separated columns"),
    (_criteo_line(2, [1] * 13, ["aa"] * 26), "the label (column 1) must be 0 or 1"),
    (_criteo_line(0, [1, "x"] + [1] * 11, ["aa"] * 26), "column 3 (I2) must be an integer"),
    (_criteo_line(1, [1] * 13, ["aa", "zz!"] + ["aa"] * 24), "column 16 (C2) must be a hex hash"),
])
def test_a_malformed_criteo_line_is_one_error_naming_file_and_line(tmp_path, line, what):
    good = _criteo_line(0, [1] * 13, ["aa"] * 26)
    path = _write(tmp_path / "bad.txt", [good, good, line, good])
    with pytest.raises(DataError) as e:
        read_criteo(path)
    message = str(e.value)
    assert message.startswith(f"{path}:3: ") and what in message and "\n" not in message


def test_criteo_held_out_split_test_path_gzip_and_config(tmp_path):
    rng = np.random.default_rng(0)
    lines = [_criteo_line(int(rng.random() < 0.3), [int(v) for v in rng.integers(0, 50, 13)],
                          [f"{v:08x}" for v in rng.integers(0, 9, 26)]) for _ in range(400)]
    path = _write(tmp_path / "train.txt.gz", lines, gz=True)
    x_train, y_train, x_test, y_test = load_criteo(path, None, 0.25, seed=0)
    assert len(x_train) + len(x_test) == 400 and 60 < len(x_test) < 140
    again = load_criteo(path, None, 0.25, seed=0)
    np.testing.assert_array_equal(again[2], x_test)
    test_file = _write(tmp_path / "test.txt", lines[:10])
    cfg = load_config(CONFIGS / "ctr_lr.yaml", ["data.name=criteo", f"data.path={path}", f"data.test_path={test_file}"])
    data = load_dataset(cfg.data, seed=0)
    assert len(data.x_train) == 400 and len(data.x_test) == 10 and data.meta.input_shape == (39,)
    assert data.reference is None
    with pytest.raises(DataError, match="no such file"):
        read_criteo(tmp_path / "absent.txt")


def test_log_loss_and_auc_against_hand_computation():
    p, y = np.array([0.8, 0.3, 0.6, 0.6]), np.array([1, 0, 0, 1])
    hand = -(math.log(0.8) + math.log(0.7) + math.log(0.4) + math.log(0.6)) / 4
    assert log_loss(p, y) == pytest.approx(hand, rel=1e-12)
    z = np.log(p / (1 - p))
    assert log_loss_of_logits(z, y) == pytest.approx(hand, rel=1e-12)
    assert log_loss_of_logits(np.array([800.0, -800.0]), np.array([1, 0])) == pytest.approx(0.0, abs=1e-300)
    # positives 0.8 and 0.6, negatives 0.3 and 0.6: pairs (0.8>0.3, 0.8>0.6, 0.6>0.3, 0.6=0.6 half) = 3.5 / 4
    assert auc(p, y) == 0.875
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.ones(5), np.array([0, 1, 0, 1, 1])) == 0.5 and auc(p, np.ones(4)) == 0.5


def test_criteo_without_a_path_is_a_config_error():
    from asyncps.errors import ConfigError

    with pytest.raises(ConfigError, match="data.path must name the criteo file"):
        load_config(CONFIGS / "ctr_lr.yaml", ["data.name=criteo"])
