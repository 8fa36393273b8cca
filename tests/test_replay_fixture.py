"""A run recorded before the shard was re-cut (mnist_softmax, 2 shards, 2 async workers, 1000
updates) replays bit for bit with today's code: the update rule, the consistency bookkeeping and
the log format did not change what a run computes.

The fixture keeps the run's final weights as their sha256 (params.sha256.json: dtype, shape and
the hash of each array's bytes), not as a binary params.npz: equal hashes are bit-for-bit
equality, and the repository tracks no data files."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from asyncps.cli.replayer import load_run, replay

FIXTURE = Path(__file__).parent / "fixtures" / "softmax_2x2_run"


def fingerprint(params: dict) -> dict:
    return {name: {"dtype": str(a.dtype), "shape": list(a.shape),
                   "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
            for name, a in sorted(params.items())}


def test_a_run_recorded_before_the_recut_replays_bit_for_bit(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    recorded = json.loads((FIXTURE / "params.sha256.json").read_text())
    assert fingerprint(replay(load_run(run)).params) == recorded  # 2 variables, bit for bit
