"""`asyncps launch`: real shard, worker and chief processes talking gRPC on 127.0.0.1."""
import json

import pytest

from cli_runner import CONFIGS, asyncps, report, run_ok
from test_train import assert_biases_untouched

LINEAR = CONFIGS / "linear_regression.yaml"


def test_dry_run_prints_every_process(tmp_path):
    proc = run_ok("launch", CONFIGS / "mnist_mlp.yaml", "--dry-run")
    assert proc.stdout.count("TF_CONFIG=") == 2 + 2 + 1
    assert not (tmp_path / "report.json").exists()


def test_linear_regression_async_two_workers(tmp_path):
    # 3000 steps of at least 2 ms: at about 1 ms a step, 600 can be over before the second
    # worker has started, and a busy machine delays a start by seconds
    run_ok("launch", LINEAR, f"run_dir={tmp_path}", "train.max_steps=3000", "delay.kind=constant",
           "delay.mean_ms=2", timeout=120)
    r = report(tmp_path)
    assert abs(r["variables"]["linear.w"][0] - 2) < 0.02 and abs(r["variables"]["linear.b"][0]) < 0.05
    assert r["pushes"]["applied"] == r["staleness"]["count"] >= r["config"]["train"]["max_steps"]
    assert set(r["staleness_per_worker"]) == {"0", "1"}
    for role in ("ps0", "worker0", "worker1", "chief"):
        assert (tmp_path / f"{role}.log").exists()


def test_sync_mode_has_zero_staleness(tmp_path):
    run_ok("launch", LINEAR, f"run_dir={tmp_path}", "cluster.mode=sync", "train.max_steps=200", timeout=120)
    r = report(tmp_path)
    assert r["staleness"]["max"] == 0 and r["staleness"]["count"] > 0


def test_ssp_bound_holds(tmp_path):
    s, workers = 2, 3
    run_ok("launch", LINEAR, f"run_dir={tmp_path}", "cluster.mode=ssp", f"cluster.staleness_bound={s}",
           f"cluster.workers={workers}", "train.max_steps=300", timeout=120)
    r = report(tmp_path)
    # A worker at clock c may read once the slowest finished c - s; between its read and its
    # push every other worker can push at most 2s + 1 times (see ps/shard.py).
    assert r["staleness"]["max"] <= (workers - 1) * (2 * s + 1)
    # in clocks: a worker pulls only at clock <= slowest + s, so it pushes at most to slowest + s + 1
    assert 0 < r["max_clock_gap"] <= s + 1


def test_bad_override_fails_before_starting_anything(tmp_path):
    proc = asyncps("launch", LINEAR, f"run_dir={tmp_path}", "cluster.mode=eventual")
    assert proc.returncode == 2 and "cluster.mode must be one of" in proc.stderr
    assert not (tmp_path / "chief.log").exists()


@pytest.mark.slow
def test_mnist_mlp_async_reaches_97_percent_with_nonzero_staleness(tmp_path):
    run_ok("launch", CONFIGS / "mnist_mlp.yaml", f"run_dir={tmp_path}", timeout=400)
    r = report(tmp_path)
    # The target is what the chief checks at every evaluation; async SGD at lr 0.1 swings by a
    # point or more between evaluations (one run: 97% at step 2042, 95.9% at the end, 3016).
    assert r["target"]["reached"], r["target"]  # at an evaluation up to the final one (~3000 + in flight)
    assert r["final"]["accuracy"] >= 0.95
    assert r["staleness"]["max"] > 0 and sum(v for k, v in r["staleness"]["histogram"].items() if k != "0") > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(row["kind"] == "eval" for row in rows)


@pytest.mark.slow
def test_partial_training_through_the_cluster_leaves_biases_bit_identical(tmp_path):
    run_ok("launch", CONFIGS / "mnist_partial.yaml", f"run_dir={tmp_path}", "train.max_steps=300", timeout=300)
    assert_biases_untouched(tmp_path)
