"""`asyncps replay`: a real asynchronous cluster run, recomputed in one process, bit for bit.

(A run whose worker was killed mid-run replays too: tests/test_faults.py checks it on the run
that kills the worker.)"""
import json

import numpy as np
import pytest

from asyncps import update_log as ul
from asyncps.runs import PARAMS_FILE, load_params
from cli_runner import CONFIGS, asyncps, run_ok


# A worker starved of CPU while it loads MNIST on a loaded machine must not be declared dead.
PATIENT = ("cluster.heartbeat_timeout=60",)


def _launch(run_dir, config, *overrides, timeout=300):
    run_ok("launch", CONFIGS / config, f"run_dir={run_dir}", *PATIENT, *overrides, timeout=timeout)


def _staleness_histogram(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())["staleness"]["histogram"]


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    """configs/mnist_softmax.yaml: 2 workers, 2 shards, async, 400 updates (the workers start
    together at the chief's start barrier, so both push and pushes are stale)."""
    run_dir = tmp_path_factory.mktemp("softmax")
    _launch(run_dir, "mnist_softmax.yaml", "train.max_steps=400")
    return run_dir


@pytest.mark.slow
def test_replay_reproduces_async_softmax_run_bit_for_bit(softmax_run):
    proc = run_ok("replay", softmax_run, timeout=300)
    assert "bit-identical" in proc.stdout
    replayed = load_params(softmax_run / "replay" / "params_replay.npz")
    final = load_params(softmax_run / PARAMS_FILE)
    assert sorted(replayed) == sorted(final)
    assert all(np.array_equal(replayed[n], final[n]) for n in final)
    summary = json.loads((softmax_run / "replay" / "replay.json").read_text())
    assert summary["identical"]
    # the replay recomputes every push's staleness: the same histogram as the shards recorded
    assert summary["staleness"]["histogram"] == _staleness_histogram(softmax_run)
    assert max(int(s) for s in summary["staleness"]["histogram"]) > 0  # a run that had staleness


@pytest.mark.slow
def test_without_staleness_is_a_different_staleness_0_result(softmax_run):
    run_ok("replay", softmax_run, "--without-staleness", timeout=300)
    counterfactual = load_params(softmax_run / "replay" / "params_without_staleness.npz")
    final = load_params(softmax_run / PARAMS_FILE)
    assert not all(np.array_equal(counterfactual[n], final[n]) for n in final)
    summary = json.loads((softmax_run / "replay" / "without_staleness.json").read_text())
    assert list(summary["staleness"]["histogram"]) == ["0"]
    assert summary["metrics"]["accuracy"] > 0.85


@pytest.mark.slow
def test_shard_log_records_every_applied_push(softmax_run):
    report = json.loads((softmax_run / "report.json").read_text())
    for shard, version in enumerate(report["versions"]):
        header, records = ul.read_log(softmax_run / "replay" / f"ps{shard}.log")
        pushes = records[records["kind"] == ul.PUSH]
        assert header["mode"] == "async" and len(pushes) == version
        assert list(pushes["version"]) == list(range(1, version + 1))


@pytest.mark.slow
def test_replay_reproduces_cnn_with_dropout_and_momentum(tmp_path, small_mnist):
    _launch(tmp_path, "mnist_cnn.yaml", "train.max_steps=20", "train.batch_size=16", "train.eval_every=0",
            f"data.path={small_mnist}")
    assert "bit-identical" in run_ok("replay", tmp_path, timeout=300).stdout


DELAY = ("delay.kind=exponential", "delay.mean_ms=3")  # real asynchrony: stale pushes on a loaded machine too


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("cluster.prefetch=true", "cluster.compression=bf16"),  # independent: one run for both
    ("cluster.mode=ssp", "cluster.staleness_bound=2", "cluster.workers=3", *DELAY),
    ("cluster.mode=sync",),
    ("staleness.controlled=true", "staleness.distribution=uniform", "staleness.s=3"),
], ids=["prefetch-bf16", "ssp", "sync", "controlled"])
def test_replay_reproduces_each_mode(tmp_path, small_mnist, overrides):
    _launch(tmp_path, "mnist_softmax.yaml", "train.max_steps=200", "train.eval_every=0", f"data.path={small_mnist}",
            *overrides)
    assert "bit-identical" in run_ok("replay", tmp_path, timeout=300).stdout
    report = json.loads((tmp_path / "report.json").read_text())
    if "cluster.mode=sync" in overrides:  # the suite's sync cluster (tests/test_cluster.py's own launch folded in)
        assert report["staleness"]["max"] == 0 and report["staleness"]["count"] > 0
    if "cluster.mode=ssp" in overrides:  # the suite's SSP cluster, likewise
        assert_ssp_bound_holds(report, s=2, workers=3)


def assert_ssp_bound_holds(report: dict, s: int, workers: int) -> None:
    # A worker at clock c may read once the slowest finished c - s; between its read and its
    # push every other worker can push at most 2s + 1 times (see ps/shard.py).
    assert report["staleness"]["max"] <= (workers - 1) * (2 * s + 1)
    # in clocks: a worker pulls only at clock <= slowest + s, so it pushes at most to slowest + s + 1
    assert 0 < report["max_clock_gap"] <= s + 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop", "dcasgd"])
def test_replay_reproduces_staleness_policies(tmp_path, policy):
    """On y = 2x: 300 updates of two workers that start together (the chief's start barrier),
    with exponential delays between their steps, so pushes are stale (most of them: 185 of 300
    dropped in a run on an idle machine; 1000 updates checked nothing more)."""
    _launch(tmp_path, "linear_regression.yaml", "train.max_steps=300", f"optimizer.staleness_policy.name={policy}",
            "optimizer.staleness_policy.max_staleness=0", *DELAY)
    assert "bit-identical" in run_ok("replay", tmp_path, timeout=300).stdout
    report = json.loads((tmp_path / "report.json").read_text())
    if policy == "drop":
        assert report["pushes"]["dropped"] > 0  # and replayed as dropped (outcomes are checked)
    else:
        assert report["staleness"]["max"] > 0  # delay compensation corrected stale pushes


def test_dcasgd_shard_keeps_what_an_exported_pull_read():
    """The gRPC pull path (export) must leave the worker's read for delay compensation."""
    from asyncps.config import from_dict
    from asyncps.ps.shard import Shard

    cfg = from_dict({"optimizer": {"name": "sgd", "learning_rate": 0.1, "staleness_policy": {"name": "dcasgd"}},
                     "cluster": {"workers": 2}})
    shard = Shard(cfg)
    shard.init({"w": np.ones(3, np.float32)})
    for worker in (0, 1):
        shard.register_worker(worker)
    version = shard.pull(0, export=lambda v, values: v)
    shard.push(1, 1, 0, {"w": np.ones(3, np.float32)})
    assert shard.push(0, 1, version, {"w": np.ones(3, np.float32)}).staleness == 1  # raised before the fix


@pytest.mark.slow
def test_replay_reproduces_sparse_embedding_gradients(tmp_path):
    _launch(tmp_path, "charlm.yaml", "train.max_steps=60", "train.eval_every=0")
    assert "bit-identical" in run_ok("replay", tmp_path, timeout=300).stdout


@pytest.mark.slow
def test_a_log_cut_short_is_refused_not_replayed_wrong(softmax_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(softmax_run, copy)
    log = copy / "replay" / "ps0.log"
    log.write_bytes(log.read_bytes()[:-10 * 32])  # the last 10 records lost (a shard killed hard)
    proc = asyncps("replay", copy)
    assert proc.returncode == 2 and "cut short" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_replay_that_does_not_match_says_so(softmax_run, tmp_path):
    """The comparison is not vacuous: a different learning rate gives other weights, exit 1."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(softmax_run, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("learning_rate: 0.1", "learning_rate: 0.1000001"))
    proc = asyncps("replay", copy)
    assert proc.returncode == 1 and "NOT identical" in proc.stdout, proc.stdout + proc.stderr


def test_run_dir_without_a_log_is_refused_with_one_line(tmp_path):
    run_ok("train", CONFIGS / "linear_regression.yaml", f"run_dir={tmp_path}", "train.max_steps=10")
    proc = asyncps("replay", tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no update log" in lines[0], proc.stderr


def test_not_a_run_dir_is_refused(tmp_path):
    proc = asyncps("replay", tmp_path / "nowhere")
    assert proc.returncode == 2 and "no config.yaml" in proc.stderr
