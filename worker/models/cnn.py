"""The classic MNIST convnet of the TensorFlow tutorials ("Deep MNIST for experts")."""
from __future__ import annotations

import math

from asyncps.worker.autodiff import ops
from asyncps.worker.models.base import Model, dense, dense_params, he_normal, zeros


class CNN(Model):
    """conv 5x5x32 + ReLU, max-pool 2x2, conv 5x5x64 + ReLU, max-pool 2x2, dense 1024 + ReLU,
    dropout (`ModelConfig.dropout`, training only), dense to the logits.

    A flat input of size s*s is read as an s x s x 1 image.
    """

    name = "cnn"

    def __init__(self, cfg, data_meta):
        super().__init__(cfg, data_meta)
        if len(self.input_shape) == 1:
            side = math.isqrt(self.input_shape[0])
            self.image_shape = (side, side, 1)
        else:
            self.image_shape = self.input_shape
        h, w, _ = self.image_shape
        self.flat = -(-h // 4) * -(-w // 4) * 64  # two SAME 2x2 pools: ceil(h / 4) x ceil(w / 4)

    def init_params(self, rng):
        channels = self.image_shape[2]
        params = {
            "conv1.kernel": he_normal(rng, 25 * channels, (5, 5, channels, 32)),
            "conv1.bias": zeros(32),
            "conv2.kernel": he_normal(rng, 25 * 32, (5, 5, 32, 64)),
            "conv2.bias": zeros(64),
        }
        params.update(dense_params("dense1", rng, self.flat, 1024, relu=True))
        params.update(dense_params("dense2", rng, 1024, self.num_classes, relu=False))
        return params

    def logits(self, params, x, training: bool = False, rng=None):
        h = ops.reshape(x, (-1, *self.image_shape))
        for name in ("conv1", "conv2"):
            h = ops.relu(ops.conv2d(h, params[f"{name}.kernel"], params[f"{name}.bias"]))
            h = ops.max_pool2d(h, padding="SAME")
        h = ops.relu(dense(params, "dense1", ops.reshape(h, (-1, self.flat))))
        if training and self.cfg.dropout > 0:
            if rng is None:
                raise ValueError("cnn: training with dropout needs an rng")
            h = ops.dropout(h, rate=self.cfg.dropout, rng=rng)
        return dense(params, "dense2", h)
