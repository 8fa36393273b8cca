"""A run recorded before the shard was re-cut (mnist_softmax, 2 shards, 2 async workers, 1000
updates) replays bit for bit with today's code: the update rule, the consistency bookkeeping and
the log format did not change what a run computes."""
import shutil
from pathlib import Path

from cli_runner import run_ok

FIXTURE = Path(__file__).parent / "fixtures" / "softmax_2x2_run"


def test_a_run_recorded_before_the_recut_replays_bit_for_bit(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    proc = run_ok("replay", run, timeout=300)
    assert "bit-identical to the run's final weights (2 variables)" in proc.stdout + proc.stderr
