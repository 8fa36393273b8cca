"""Gradient checks: VJPs against central finite differences along random directions.

For ``y = f(x_1, ..., x_k)``, a random output cotangent ``v`` and random input directions
``d_i``, the VJP must satisfy ``sum_i <vjp_i(v), d_i> = d/dt <v, f(x + t d)>`` at ``t = 0``;
the right side is estimated by a central difference in float64. One direction checks every
input element at once, so the cost does not grow with the input size (as autograd's
``check_grads``).
"""
from __future__ import annotations

import numpy as np

from asyncps.worker.autodiff.core import GradientTape, SparseRows, value_of


class GradCheckError(AssertionError):
    """A VJP disagrees with finite differences."""


def _dense(g) -> np.ndarray:
    return g.to_dense() if isinstance(g, SparseRows) else np.asarray(g)


def directional_derivatives(fn, args, rng: np.random.Generator, eps: float = 1e-6):
    """(analytic, numeric) directional derivatives of ``<v, fn(*args)>`` along one random direction."""
    args = [np.asarray(a, dtype=np.float64) for a in args]
    with GradientTape() as tape:
        watched = [tape.watch(a) for a in args]
        y = fn(*watched)
    v = rng.standard_normal(np.shape(value_of(y)))
    grads = tape.gradient(y, watched, output_gradients=v)
    dirs = [rng.standard_normal(a.shape) for a in args]
    analytic = sum(float(np.vdot(_dense(g), d)) for g, d in zip(grads, dirs))

    def along(t):
        return float(np.vdot(v, value_of(fn(*[a + t * d for a, d in zip(args, dirs)]))))

    return analytic, (along(eps) - along(-eps)) / (2 * eps)


def check_grads(fn, *args, rng: np.random.Generator | None = None, directions: int = 2,
                rtol: float = 1e-5, atol: float = 1e-7, name: str | None = None) -> None:
    """Raise `GradCheckError` unless `fn`'s VJPs match finite differences in float64.

    `fn` takes one Tensor per array in `args` and returns a Tensor; integer or other
    non-differentiable inputs belong in `fn`'s closure.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    for _ in range(directions):
        analytic, numeric = directional_derivatives(fn, args, rng)
        if abs(analytic - numeric) > atol + rtol * max(abs(analytic), abs(numeric)):
            label = name or getattr(fn, "__name__", "function")
            raise GradCheckError(f"{label}: VJP gives {analytic:.10g}, finite differences {numeric:.10g}")
