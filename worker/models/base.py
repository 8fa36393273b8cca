"""What every model shares: metadata access, initialisers, the loss and batched evaluation."""
from __future__ import annotations

import math

import numpy as np

from asyncps.worker.autodiff import ops


def meta_get(data_meta, key: str, default=None):
    """`data_meta[key]` for a dict, `data_meta.key` for an object, else `default`."""
    if isinstance(data_meta, dict):
        return data_meta.get(key, default)
    return getattr(data_meta, key, default)


def he_normal(rng: np.random.Generator, fan_in: int, shape: tuple) -> np.ndarray:
    """He et al. (2015) initialisation for layers followed by a ReLU: N(0, 2 / fan_in)."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """Glorot & Bengio (2010): U(-l, l) with l = sqrt(6 / (fan_in + fan_out))."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def zeros(*shape) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def dense_params(name: str, rng, fan_in: int, fan_out: int, relu: bool) -> dict[str, np.ndarray]:
    """``name.kernel`` (He for ReLU layers, Glorot otherwise) and a zero ``name.bias``."""
    shape = (fan_in, fan_out)
    kernel = he_normal(rng, fan_in, shape) if relu else glorot_uniform(rng, fan_in, fan_out, shape)
    return {f"{name}.kernel": kernel, f"{name}.bias": zeros(fan_out)}


def dense(params, name: str, x):
    """``x @ name.kernel + name.bias`` as one fused op."""
    return ops.linear(x, params[f"{name}.kernel"], params[f"{name}.bias"])


def batches(n: int, size: int):
    """Slices covering range(n) in chunks of `size`."""
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


class Model:
    """A classifier: parameters keyed by dotted names, a loss on the tape, batched evaluation.

    Subclasses define `init_params(rng)` and `logits(params, x, training, rng)`; `params` may
    hold Tensors (on a tape) or plain arrays.
    """

    name = "model"

    def __init__(self, cfg, data_meta):
        self.cfg = cfg
        self.input_shape = tuple(meta_get(data_meta, "input_shape", (784,)))
        self.num_classes = int(meta_get(data_meta, "num_classes", None) or 10)  # None: a regression model

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def logits(self, params, x, training: bool = False, rng=None):
        raise NotImplementedError

    def loss(self, params, x, y, training: bool = False, rng=None):
        """Mean softmax cross-entropy of the batch, a scalar Tensor."""
        return ops.softmax_cross_entropy(self.logits(params, x, training, rng), y)

    def evaluate(self, params: dict, x, y, batch_size: int = 1000) -> dict[str, float]:
        """Mean loss and accuracy over (x, y), in batches, without a tape."""
        loss_sum, correct = 0.0, 0
        for s in batches(len(x), batch_size):
            logits = self.logits(params, x[s]).value
            loss_sum += float(ops.softmax_cross_entropy(logits, y[s]).value) * len(logits)
            correct += int(np.sum(np.argmax(logits, axis=1) == y[s]))
        return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}
