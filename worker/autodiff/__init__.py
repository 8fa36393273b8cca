"""The worker's reverse-mode autodiff engine on numpy.

::

    from asyncps.worker.autodiff import GradientTape, ops, SparseRows

    with GradientTape() as tape:
        p = tape.watch(params)            # dict[str, ndarray] -> dict[str, Tensor]
        loss = ops.softmax_cross_entropy(ops.linear(x, p["w"], p["b"]), y)
    grads = tape.gradient(loss, p)        # dict[str, ndarray | SparseRows], keyed like p

`graph.trace_gradient` traces such a loss once and replays it with preallocated buffers;
`gradcheck.check_grads` compares VJPs with central finite differences.
"""
from asyncps.worker.autodiff import ops
from asyncps.worker.autodiff.core import GradientTape, Op, SparseRows, Tensor, unbroadcast

__all__ = ["GradientTape", "Op", "SparseRows", "Tensor", "ops", "unbroadcast"]
