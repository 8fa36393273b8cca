"""The CTR model over an id-keyed table (worker/models/ctr.py, cli/id_tables.py): hashed feature
ids, rows made on first touch, row-wise pull/push per batch, AUC; refused by launch for now."""
import numpy as np

from asyncps.config import load_config
from asyncps.worker.data import load_dataset
from asyncps.worker.data.ctr import make_ctr
from asyncps.worker.models.ctr import auc
from asyncps.worker.tables import localize
from cli_runner import CONFIGS, asyncps, report, run_ok

CTR = CONFIGS / "ctr.yaml"
SMALL = ["data.num_train=20000", "data.num_test=4000", "data.vocab=2000", "train.max_steps=400", "train.eval_every=200"]


def test_ids_are_hashed_deterministic_and_labels_follow_the_truth():
    a = make_ctr(500, 100, fields=4, vocab=50, seed=3)
    b = make_ctr(500, 100, fields=4, vocab=50, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    x_train = a[0]
    assert x_train.dtype == np.int64 and x_train.shape == (500, 4)
    assert not set(x_train[:, 0].tolist()) & set(x_train[:, 1].tolist())  # fields hash apart
    assert 0.1 < a[1].mean() < 0.6


def test_localize_rewrites_a_batch_as_indices_into_its_unique_ids():
    x = np.array([[7, -3], [7, 2**62]], np.int64)
    ids, local = localize(x)
    assert ids.tolist() == [-3, 7, 2**62] and (ids[local] == x).all()


def test_auc_is_the_rank_statistic():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # a tie counts half


def test_ctr_trains_in_one_process_with_rows_made_on_first_touch(tmp_path):
    run_ok("train", CTR, f"run_dir={tmp_path}", *SMALL, timeout=300)
    r = report(tmp_path)
    table = r["tables"]["ctr.embed"]
    cfg = load_config(CTR, SMALL)
    data = load_dataset(cfg.data, seed=cfg.seed)
    seen = len(np.unique(data.x_train))
    assert 0 < table["rows"] <= seen and table["evicted"] == 0  # only ids a batch touched
    assert r["final"]["auc"] > 0.6 and 0 < r["final"]["loss"] < 0.69


def test_launch_refuses_id_tables_in_one_line(tmp_path):
    proc = asyncps("launch", CTR, f"run_dir={tmp_path / 'r'}", timeout=60)
    assert proc.returncode == 2 and "asyncps train" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
