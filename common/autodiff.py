"""The public autodiff API for writing models: the tape, tensors, the ops and gradient checks.

::

    from asyncps.autodiff import GradientTape, ops

    with GradientTape() as tape:
        p = tape.watch(params)                       # dict[str, ndarray] -> dict[str, Tensor]
        loss = ops.softmax_cross_entropy(ops.linear(x, p["w"], p["b"]), y)
    grads = tape.gradient(loss, p)                   # dict[str, ndarray | SparseRows]

`ops` holds every primitive (each with its vector-Jacobian product): elementwise arithmetic
with broadcasting (also as Tensor operators ``+ - * / ** @``, ``-x``, ``x[idx]``), exp, log,
tanh, sigmoid, relu, matmul, linear (x @ w + b), sum/mean/max with axes, reshape, transpose,
concat, getitem, gather (embedding lookup: a sparse-rows gradient), conv2d, max_pool2d,
dropout, softmax, log_softmax, softmax_cross_entropy, l2_loss. A composite (a layer norm, an
attention) is plain Python over these. A new primitive is ``ops.defop(name, forward, *vjps)``
(see asyncps/worker/autodiff/ops.py) and must pass `check_grads`.

This module re-exports `asyncps.worker.autodiff`; everything else under `asyncps.worker` is
internal (it may change without notice).
"""
from asyncps.worker.autodiff import GradientTape, SparseRows, Tensor, ops, unbroadcast
from asyncps.worker.autodiff.gradcheck import GradCheckError, check_grads

__all__ = ["GradCheckError", "GradientTape", "SparseRows", "Tensor", "check_grads", "ops", "unbroadcast"]
