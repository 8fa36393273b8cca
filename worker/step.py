"""Gradients of one batch: the single place where trainer and cluster worker call the model."""
from __future__ import annotations

import ctypes
import os

import numpy as np

from asyncps.worker.autodiff import GradientTape, SparseRows
from asyncps.worker.autodiff.graph import GraphFunction


class GradientComputer:
    """``(params, x, y, rng) -> (loss, grads)`` for the `trainable` parameters only.

    Parameters not in `trainable` (frozen ones) are constants: they are not watched and get no
    gradient. With `graph_mode` the step is traced once per batch shape and replayed, and the
    dense gradients it returns are the replay's own buffers: valid until the next call, so use
    them (apply, encode, copy) before calling again. Both callers do: the trainer applies them at
    once, the worker encodes them before its push returns (also under cluster.prefetch).
    """

    def __init__(self, model, trainable: list[str], graph_mode: bool = False):
        self.model = model
        self.trainable = list(trainable)
        self.graph_mode = graph_mode
        # reuse_outputs: no per-step allocation of the gradients (see graph.py)
        self._graph = GraphFunction(self._loss, wrt=self.trainable, reuse_outputs=True) if graph_mode else None

    def _loss(self, params, x, y, rng):
        return self.model.loss(params, x, y, training=True, rng=rng)

    def __call__(self, params: dict[str, np.ndarray], x, y, rng: np.random.Generator, out: dict | None = None
                 ) -> tuple[float, dict[str, np.ndarray | SparseRows]]:
        """`out`: {name: array} to return those dense gradients in (the worker passes views of
        its shared-memory push region, so the push copies nothing; GradientTape.gradient). Graph
        mode returns its own buffers and ignores it."""
        if self._graph is not None:
            return self._graph(params, x, y, rng)
        with GradientTape() as tape:
            watched = {k: tape.watch(params[k]) for k in self.trainable}
            loss = self._loss({**params, **watched}, x, y, rng)
        return float(loss.value), tape.gradient(loss, watched, out=out)


_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS")
_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads")


def limit_blas_threads(n: int = 1) -> bool:
    """Caps the BLAS (OpenBLAS) thread pool of this process at `n`; True if it was capped.

    A cluster worker calls this with 1: on a machine shared by several workers and shards, a
    BLAS pool per worker oversubscribes the cores, and OpenBLAS threads spin while they wait
    (measured on 2 cores: one MLP step costs 5.5 ms of CPU with 2 threads, 3.0 ms with 1, for
    a 10% shorter step). Workers are the parallelism. An explicit ``OPENBLAS_NUM_THREADS`` (or
    OMP/MKL/GOTO) in the environment wins: nothing is changed then.
    """
    if any(os.environ.get(name) for name in _BLAS_ENV):
        return False
    try:
        from threadpoolctl import threadpool_limits  # the general tool, where installed

        threadpool_limits(n, user_api="blas")
        return True
    except ImportError:
        pass
    for path in _loaded_libraries("openblas"):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _OPENBLAS_SETTERS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                return True
    return False


def _loaded_libraries(fragment: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose file name has `fragment`."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:  # not Linux: nothing found, nothing changed
        return []
    return sorted(p for p in paths if fragment in os.path.basename(p).lower())
