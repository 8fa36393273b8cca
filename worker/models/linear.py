"""Linear regression (the y = 2x example) and softmax regression."""
from __future__ import annotations

import math

import numpy as np

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, batches, dense, zeros


def _small(rng, scale: float, shape: tuple) -> np.ndarray:
    """N(0, scale^2) weights, or zeros when scale is 0."""
    if scale == 0:
        return zeros(*shape)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class LinearRegression(Model):
    """``y = x @ w + b`` with mean squared error; parameters ``linear.w``, ``linear.b``."""

    name = "linear"

    def init_params(self, rng):
        d = math.prod(self.input_shape)
        return {"linear.w": _small(rng, self.cfg.init_scale, (d, 1)), "linear.b": zeros(1)}

    def predict(self, params, x):
        """Predictions of shape (n, 1)."""
        x = ops.reshape(x, (-1, math.prod(self.input_shape)))
        return ops.linear(x, params["linear.w"], params["linear.b"])

    def loss(self, params, x, y, training: bool = False, rng=None):
        """Mean squared error."""
        err = self.predict(params, x) - ops.reshape(y, (-1, 1))
        return ops.mean(err * err)

    def evaluate(self, params, x, y, batch_size: int = 1000):
        """Mean squared error over (x, y), reported as both ``mse`` and ``loss``."""
        sq = sum(float(self.loss(params, x[s], y[s]).value) * len(x[s]) for s in batches(len(x), batch_size))
        return {"loss": sq / len(x), "mse": sq / len(x)}


class SoftmaxRegression(Model):
    """Multinomial logistic regression; parameters ``softmax.kernel``, ``softmax.bias``."""

    name = "softmax"

    def init_params(self, rng):
        d = math.prod(self.input_shape)
        kernel = _small(rng, self.cfg.init_scale, (d, self.num_classes))
        return {"softmax.kernel": kernel, "softmax.bias": zeros(self.num_classes)}

    def logits(self, params, x, training: bool = False, rng=None):
        return dense(params, "softmax", ops.reshape(x, (-1, math.prod(self.input_shape))))
