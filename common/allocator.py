"""Keeps freed megabyte buffers in the process instead of giving them back to the OS each step.

Why: a training step allocates and frees blocks of a megabyte or so by the dozen (a 128 x 256
activation is 128 KiB; a gradient of the MLP's first layer 784 KiB, its wire copy as much again).
With glibc's defaults such memory goes back to the OS when freed (blocks of 128 KiB or more are
mmapped until the dynamic threshold rises, and the free top of an arena is trimmed) and is
faulted in again page by page the next step. Measured on the 2-core machine (/proc/PID/stat over
5 s of a gRPC launch): a cluster worker took 44 minor page faults per step and its shard about
160; with the thresholds raised, 4 and 2, and `bench/pushpull.py --transport grpc` went 3.18-3.56
-> 2.67-3.10 ms per round trip (docs/performance.md). The step's pattern in a thread other than
the main one (where a worker's loop and a shard's gRPC handlers run) took 280 faults per 50
cycles with the defaults, 8 with the thresholds (tests/test_allocator.py), against 9 in the main
thread either way. The cost is memory kept: up to TRIM_THRESHOLD of freed heap per process stays mapped.

`tune_allocator()` is called once at the start of every asyncps process (cli/main.py: train,
launch and each role it starts, compose containers alike). It changes nothing where the C
library is not glibc (no `mallopt`), or where the user set glibc's own environment variables
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): those win.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 16 << 20  # blocks below this come from the heap (glibc allows up to 32 MiB)
TRIM_THRESHOLD = 64 << 20  # freed heap kept before it is returned to the OS
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_tuned = False


def tune_allocator() -> bool:
    """Raises glibc's mmap and trim thresholds for this process (module docstring); True if set."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in USER_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _tuned:
        logger.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return _tuned
