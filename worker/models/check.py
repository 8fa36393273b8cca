"""`check_model`: does a model keep the `Model` contract? One call, before a cluster run.

A mistake here (float64 parameters, a name that changes between processes, a loss that is not a
scalar) would otherwise show up as a shard refusing a push, in another process's log.
"""
from __future__ import annotations

import math

import numpy as np

from asyncps.errors import UserError


def check_model(model, x, y, seed: int = 0, batch_size: int = 8) -> dict:
    """Runs `model` on the first `batch_size` examples of (x, y) the way a run does, and raises
    a one-line UserError at the first breach of the contract:

    - ``init_params`` gives a non-empty dict of str -> float32 ndarray, the same for the same seed;
    - ``loss`` (on a tape, training=True) is a finite scalar Tensor, with a gradient for every
      parameter of its shape and dtype, sparse rows exactly for `model.tables`;
    - ``evaluate`` gives a dict of str -> finite float that has ``loss``.

    Returns ``{"params": count, "loss": float, "metrics": dict}`` when all is well.
    """
    from asyncps.worker.autodiff import SparseRows
    from asyncps.worker.step import GradientComputer

    who = type(model).__name__
    params = model.init_params(np.random.default_rng(seed))
    if not isinstance(params, dict) or not params:
        raise UserError(f"{who}.init_params must return a non-empty dict of name -> array, got {type(params).__name__}")
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"{who}.init_params: variable names must be non-empty strings, got {name!r}")
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise UserError(f"{who}.init_params: {name} must be a float32 numpy array, got {kind}")
    again = model.init_params(np.random.default_rng(seed))
    if sorted(again) != sorted(params) or any(not np.array_equal(again[n], params[n]) for n in params):
        raise UserError(f"{who}.init_params gives different variables for the same seed: every process of a run "
                        "must compute the same ones (draw only from the rng it is given)")
    unknown = set(model.tables) - set(params)
    if unknown:
        raise UserError(f"{who}.tables names variables init_params does not make: {sorted(unknown)}")

    xb, yb = x[:batch_size], y[:batch_size]
    loss, grads = GradientComputer(model, sorted(params))(params, xb, yb, np.random.default_rng(seed))
    if not math.isfinite(loss):
        raise UserError(f"{who}.loss is not finite on the first {len(xb)} examples: {loss}")
    for name, value in params.items():
        grad = grads.get(name)
        if grad is None:
            raise UserError(f"{who}.loss does not depend on {name} (no gradient): drop it or use it")
        sparse = isinstance(grad, SparseRows)
        if sparse != (name in model.tables):
            raise UserError(f"{who}: {name} has a {'sparse' if sparse else 'dense'} gradient but is "
                            f"{'' if name in model.tables else 'not '}in {who}.tables")
        g = grad.values if isinstance(grad, SparseRows) else grad
        shape = value.shape[1:] if sparse else value.shape
        if g.dtype != np.float32 or tuple(g.shape[1:] if sparse else g.shape) != tuple(shape):
            raise UserError(f"{who}: the gradient of {name} is {g.dtype}{list(g.shape)}, expected float32 of the "
                            f"variable's shape {list(value.shape)} (float64 inputs or constants widen it)")
    metrics = model.evaluate(params, xb, yb)
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise UserError(f"{who}.evaluate must return a dict with at least 'loss', got {metrics!r:.120}")
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{who}.evaluate: {key!r} must map to a finite float, got {value!r:.60}")
    return {"params": sum(v.size for v in params.values()), "loss": loss, "metrics": metrics}
