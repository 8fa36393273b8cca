"""`asyncps train`: the articles' examples reach their targets in one process.

(The MNIST MLP to 97% is trained once in the suite, through the cluster while processes are
killed: tests/test_faults.py. Here the same training loop takes softmax regression to 90.5%.)"""
import numpy as np
import pytest

from asyncps.config import load_config
from asyncps.runs import load_params
from cli_runner import CONFIGS, asyncps, report, run_ok


def test_linear_regression_learns_y_equals_2x(tmp_path):
    run_ok("train", CONFIGS / "linear_regression.yaml", f"run_dir={tmp_path}")
    r = report(tmp_path)
    assert abs(r["variables"]["linear.w"][0] - 2) < 0.02 and abs(r["variables"]["linear.b"][0]) < 0.05
    assert r["target"]["reached"] and r["staleness"]["max"] == 0
    assert (tmp_path / "metrics.jsonl").read_text().count('"kind": "eval"') >= 1


def test_missing_config_file_is_one_line(tmp_path):
    proc = asyncps("train", tmp_path / "absent.yaml")
    assert proc.returncode == 2 and "absent.yaml: cannot read config file" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_missing_idx_folder_is_named(tmp_path):
    proc = asyncps("train", CONFIGS / "mnist_softmax.yaml", f"data.path={tmp_path / 'nowhere'}", f"run_dir={tmp_path}")
    assert proc.returncode == 2 and "nowhere" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_mnist_softmax_trains(tmp_path):
    run_ok("train", CONFIGS / "mnist_softmax.yaml", f"run_dir={tmp_path}")
    assert report(tmp_path)["final"]["accuracy"] >= 0.905


def test_partial_training_leaves_biases_bit_identical(tmp_path, small_mnist):
    # the MNIST-shaped folder of tests/conftest.py: which variables change does not depend on the pixels
    run_ok("train", CONFIGS / "mnist_partial.yaml", f"run_dir={tmp_path}", "train.max_steps=300",
           f"data.path={small_mnist}")
    assert_biases_untouched(tmp_path)


def assert_biases_untouched(run_dir):
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model
    from asyncps.worker.variables import initial_params

    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg.model, load_dataset(cfg.data, context=cfg.model.context).meta)
    before, after = initial_params(cfg, model), load_params(run_dir / "params.npz")
    biases = [n for n in before if n.endswith(".bias")]
    assert biases
    for name in before:
        same = np.array_equal(before[name], after[name])
        assert same == (name in biases), name


@pytest.mark.slow
def test_charlm_trains_and_samples_at_temperature(tmp_path):
    run_ok("train", CONFIGS / "charlm.yaml", f"run_dir={tmp_path}", "train.max_steps=300")
    proc = run_ok("sample", tmp_path, "--length", "80")
    assert len(proc.stdout.strip()) > 0
    bad = asyncps("sample", tmp_path, "--temperature", "0")
    assert bad.returncode == 2 and "temperature" in bad.stderr
