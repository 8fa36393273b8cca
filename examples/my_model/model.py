"""A tiny residual MLP with layer normalisation, written against asyncps's public API only."""
from __future__ import annotations

import math

from asyncps.autodiff import ops
from asyncps.models import Model, dense, dense_params, ones, zeros


def layer_norm(params, name: str, h, eps: float = 1e-5):
    """Ba et al. (2016): normalise each example over its features, then scale and shift.

    Composed from existing ops (mean, subtract, multiply, power), so the tape differentiates
    it with no new primitive; parameters ``name.gain`` and ``name.bias``.
    """
    centred = h - ops.mean(h, axis=-1, keepdims=True)
    variance = ops.mean(centred * centred, axis=-1, keepdims=True)
    return centred * (variance + eps) ** -0.5 * params[f"{name}.gain"] + params[f"{name}.bias"]


class ResidualMLP(Model):
    """input -> dense to `width` -> `blocks` x [h + fc2(relu(fc1(layer_norm(h))))] -> layer_norm -> logits.

    Keyword arguments come from the config's ``model:`` section (every key but ``name``).
    The default `loss` (softmax cross-entropy) and `evaluate` (loss, accuracy) of `Model` use
    `logits`, so a classifier defines only `init_params` and `logits`.
    """

    def __init__(self, cfg, data_meta, width: int = 64, blocks: int = 2, expansion: int = 2):
        super().__init__(cfg, data_meta)  # sets self.input_shape and self.num_classes
        if width < 1 or blocks < 0 or expansion < 1:
            raise ValueError(f"width, blocks and expansion must be positive, got {width}, {blocks}, {expansion}")
        self.width, self.blocks, self.hidden = width, blocks, width * expansion
        self.features = math.prod(self.input_shape)

    def init_params(self, rng):
        params = dense_params("embed", rng, self.features, self.width, relu=False)
        for i in range(1, self.blocks + 1):
            params[f"block{i}.norm.gain"], params[f"block{i}.norm.bias"] = ones(self.width), zeros(self.width)
            params.update(dense_params(f"block{i}.fc1", rng, self.width, self.hidden, relu=True))
            params.update(dense_params(f"block{i}.fc2", rng, self.hidden, self.width, relu=False))
        params["norm.gain"], params["norm.bias"] = ones(self.width), zeros(self.width)
        params.update(dense_params("head", rng, self.width, self.num_classes, relu=False))
        return params

    def logits(self, params, x, training: bool = False, rng=None):
        h = dense(params, "embed", ops.reshape(x, (-1, self.features)))
        for i in range(1, self.blocks + 1):
            inner = ops.relu(dense(params, f"block{i}.fc1", layer_norm(params, f"block{i}.norm", h)))
            h = h + dense(params, f"block{i}.fc2", inner)
        return dense(params, "head", layer_norm(params, "norm", h))
