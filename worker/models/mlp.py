"""A multilayer perceptron: ReLU layers of widths `ModelConfig.hidden`, then the logits."""
from __future__ import annotations

import math

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, dense, dense_params


class MLP(Model):
    """Layers ``dense1 .. denseK`` (ReLU) and ``dense{K+1}`` (logits)."""

    name = "mlp"

    def _widths(self) -> list[int]:
        return [math.prod(self.input_shape), *self.cfg.hidden, self.num_classes]

    def init_params(self, rng):
        widths, params = self._widths(), {}
        last = len(widths) - 1
        for i in range(last):
            params.update(dense_params(f"dense{i + 1}", rng, widths[i], widths[i + 1], relu=i + 1 < last))
        return params

    def logits(self, params, x, training: bool = False, rng=None):
        h = ops.reshape(x, (-1, math.prod(self.input_shape)))
        layers = len(self.cfg.hidden)
        for i in range(layers):
            h = ops.relu(dense(params, f"dense{i + 1}", h))
        return dense(params, f"dense{layers + 1}", h)
