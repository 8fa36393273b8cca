"""`asyncps launch`: real shard, worker and chief processes talking gRPC on 127.0.0.1.

Other launches are tested where their subject is: the async two-worker run of y = 2x in
tests/test_telemetry.py (its rows add up to its report), the MNIST MLP to 97% in
tests/test_faults.py (while a worker, a shard and the chief are killed), compression,
prefetching, delays and replay in their own files; sync mode's zero staleness and SSP's
bound on the sync and SSP runs that tests/test_replay.py replays.
"""
import pytest

from cli_runner import CONFIGS, asyncps, run_ok
from test_train import assert_biases_untouched

LINEAR = CONFIGS / "linear_regression.yaml"


def test_dry_run_prints_every_process(tmp_path):
    proc = run_ok("launch", CONFIGS / "mnist_mlp.yaml", "--dry-run")
    assert proc.stdout.count("TF_CONFIG=") == 1 + 2 + 1  # 1 shard, 2 workers, the chief
    assert not (tmp_path / "report.json").exists()


def test_bad_override_fails_before_starting_anything(tmp_path):
    proc = asyncps("launch", LINEAR, f"run_dir={tmp_path}", "cluster.mode=eventual")
    assert proc.returncode == 2 and "cluster.mode must be one of" in proc.stderr
    assert not (tmp_path / "chief.log").exists()


@pytest.mark.slow
def test_partial_training_through_the_cluster_leaves_biases_bit_identical(tmp_path, small_mnist):
    # the MNIST-shaped folder of tests/conftest.py: which variables change does not depend on the pixels
    run_ok("launch", CONFIGS / "mnist_partial.yaml", f"run_dir={tmp_path}", "train.max_steps=300",
           f"data.path={small_mnist}", timeout=300)
    assert_biases_untouched(tmp_path)
