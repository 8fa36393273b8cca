"""The CTR models over id-keyed tables (worker/models/ctr.py, ctr_lr.py, ctr_deep.py;
cli/id_tables.py): hashed feature ids, rows made on first touch, row-wise pull/push per batch, log
loss and AUC beside the planted model's (cluster runs: tests/test_sparse_cluster.py)."""
import json

import numpy as np
import pytest

from asyncps.config import load_config
from asyncps.worker.data import load_dataset
from asyncps.worker.data.ctr import make_ctr
from asyncps.worker.models.ctr import auc
from asyncps.worker.tables import localize
from cli_runner import CONFIGS, report, run_ok

CTR = CONFIGS / "ctr.yaml"
# a small case of the click logs: 6 categorical fields over vocabularies 300 .. 4, 3 counts
TINY = ["data.num_train=30000", "data.num_test=10000", "data.fields=6", "data.numeric=3", "data.vocab=300",
        "train.batch_size=256", "train.eval_every=0", "train.target.value=null"]
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


def _planted_run(tmp_path, config, *overrides):
    proc = run_ok("train", CONFIGS / config, f"run_dir={tmp_path}", *TINY, *overrides, timeout=300)
    r = report(tmp_path)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("planted model: loss=") and "(best achievable); this run: loss +" in line
    return r, r["final"], r["reference"]


def test_ctr_lr_comes_near_the_planted_model(tmp_path):
    r, final, planted = _planted_run(tmp_path, "ctr_lr.yaml", "train.max_steps=700")
    assert set(final) >= {"loss", "auc"} and set(planted) == {"loss", "auc"}
    assert planted["loss"] < final["loss"] < planted["loss"] + 0.01  # +0.004 measured
    assert final["auc"] > planted["auc"] - 0.02
    assert r["tables"]["ctr_lr.weights"]["rows"] > 0 and "bias" in r["variables"]


def test_ctr_deep_learns_the_interactions_logistic_regression_cannot(tmp_path):
    """With planted interactions, wide & deep ends nearer the planted loss than logistic
    regression trained alike (which cannot represent them)."""
    shared = ["data.interactions=2", "data.interaction_std=1.0", "train.max_steps=700"]
    _, deep, planted = _planted_run(tmp_path / "deep", "ctr_deep.yaml", *shared, "model.hidden=[32]")
    _, lr, planted_again = _planted_run(tmp_path / "lr", "ctr_lr.yaml", *shared)
    assert planted == planted_again  # the same data
    assert planted["loss"] < deep["loss"] < lr["loss"] - 0.01, (deep, lr, planted)


@pytest.mark.slow
def test_eval_scores_a_cluster_checkpoint_of_id_tables_as_the_run_did(tmp_path):
    """`asyncps eval` reads the table files of a checkpoint (rows by id, unseen ids' first values)
    and gets the run's own final evaluation."""
    launched = run_ok("launch", CONFIGS / "ctr_lr.yaml", f"run_dir={tmp_path}", *TINY, "train.max_steps=200",
                      "checkpoint.every_steps=200", timeout=300)
    assert "reference" in report(tmp_path)  # the planted model's loss/AUC, as `train` reports it
    assert "planted model:" in launched.stdout + launched.stderr
    final = report(tmp_path)["final"]
    scored = json.loads(run_ok("eval", tmp_path, "--json", timeout=300).stdout)
    assert scored["step"] == 200
    for key in ("loss", "auc", "accuracy"):
        assert scored[key] == pytest.approx(final[key], rel=1e-9), key
