"""A run recorded before the shard was re-cut (mnist_softmax, 2 shards, 2 async workers, 1000
updates) replays bit for bit with today's code: the update rule, the consistency bookkeeping and
the log format did not change what a run computes.

The fixture keeps the run's final weights as their sha256 (params.sha256.json: dtype, shape and
the hash of each array's bytes), not as a binary params.npz: equal hashes are bit-for-bit
equality, and the repository tracks no data files.

Bits depend on the BLAS kernels as well as on the code: OpenBLAS picks its kernels for the CPU it
finds, and a matrix product sums in another order on another family (on an AMD EPYC with AVX-512
it chose kernels whose replay differed from the recording in the last bits). So the replay runs in
a child process with the kernels pinned (``OPENBLAS_CORETYPE``), and is compared with the hashes
made under those kernels: SkylakeX (AVX-512) are the recording's own; Haswell (AVX2, every x86-64
CPU since 2013) were made by replaying the fixture with today's code, which reproduces the
recording under SkylakeX (so the Haswell hashes are what the recorded code computes there).
numpy's own SIMD paths did not change the hashes (checked with NPY_DISABLE_CPU_FEATURES).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "softmax_2x2_run"
KERNELS = {  # OPENBLAS_CORETYPE -> (the file of its hashes, the CPU feature it needs)
    "SkylakeX": ("params.sha256.json", "AVX512F"),
    "Haswell": ("params.sha256.haswell.json", "AVX2"),
}
REPLAY = """
import hashlib, json, shutil, sys, tempfile
from pathlib import Path
import numpy as np
from asyncps.cli.replayer import load_run, replay
with tempfile.TemporaryDirectory() as tmp:
    params = replay(load_run(shutil.copytree(sys.argv[1], Path(tmp) / "run"))).params
print(json.dumps({name: {"dtype": str(a.dtype), "shape": list(a.shape),
                         "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
                  for name, a in sorted(params.items())}))
"""


def cpu_has(feature: str) -> bool:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy >= 2
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__  # numpy 1.26
    return bool(__cpu_features__.get(feature))


def uses_openblas() -> bool:
    config = getattr(np.__config__, "CONFIG", {})
    return "openblas" in str(config.get("Build Dependencies", {}).get("blas", {}).get("name", "")).lower()


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_a_run_recorded_before_the_recut_replays_bit_for_bit(kernels):
    hashes, feature = KERNELS[kernels]
    if not uses_openblas():
        pytest.skip("the recorded hashes are OpenBLAS's; this numpy uses another BLAS")
    if not cpu_has(feature):
        pytest.skip(f"OpenBLAS's {kernels} kernels need {feature}, which this CPU lacks")
    env = {**os.environ, "OPENBLAS_CORETYPE": kernels, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", REPLAY, str(FIXTURE)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    recorded = json.loads((FIXTURE / hashes).read_text())
    assert json.loads(out.stdout.splitlines()[-1]) == recorded  # 2 variables, bit for bit
