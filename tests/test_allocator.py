"""common/allocator.py: freed megabyte buffers are reused instead of mapped afresh each step.

The pattern is a training step's: megabyte arrays of slightly varying size allocated, touched
and freed over and over in a thread that is not the main one (a worker's loop, a shard's gRPC
handlers). Each run is a fresh interpreter, since the tuning is for the whole process.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from asyncps.allocator import USER_ENV

PATTERN = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "tuned":
    from asyncps.allocator import tune_allocator
    if not tune_allocator():
        print("untunable"); sys.exit(0)
def cycles(n):
    for i in range(n):
        a = np.empty((1 << 18) + (i % 7) * 4096, np.float32); a.fill(1.0)
        b = np.empty(1 << 16, np.float32); b.fill(2.0)
        del a, b
out = []
def run():
    cycles(5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycles(100)
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=run); t.start(); t.join()
print(out[0])
"""


def _faults(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
    return subprocess.run([sys.executable, "-c", PATTERN, mode], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_buffers_are_reused_once_tuned():
    tuned = _faults("tuned")
    if tuned == "untunable":
        pytest.skip("this C library has no mallopt (not glibc)")
    plain = int(_faults("plain"))
    # untuned, glibc maps and unmaps such blocks in a thread's arena (measured: 280 faults per 50
    # cycles); tuned, the heap keeps them (8)
    assert int(tuned) < 50 and int(tuned) * 5 < plain, (tuned, plain)


def test_the_users_own_malloc_settings_win(monkeypatch):
    from asyncps import allocator

    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator.tune_allocator() is False
