"""What every model shares: metadata access, initialisers, the loss and batched evaluation.

Public through `asyncps.models` (the `Model` contract, the initialisers, `dense`, `batches`).
"""
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
    """A float32 array of zeros (biases, shifts)."""
    return np.zeros(shape, dtype=np.float32)


def ones(*shape) -> np.ndarray:
    """A float32 array of ones (scales, e.g. a layer normalisation's gain)."""
    return np.ones(shape, dtype=np.float32)


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
    """The base class of every model, built-in or a user's (public as `asyncps.models.Model`).

    The contract, i.e. exactly what the rest of the system calls (worker/step.py, the chief's
    evaluation in chief/main.py, `asyncps train`, cli/replayer.py, `asyncps eval`):

    - ``Model(cfg, data_meta, **options)``: built once per process, in every process of a run,
      from the config alone. `cfg` is the `ModelConfig` (its `options` are the extra keys of
      the YAML's ``model:`` section, also passed as keyword arguments), `data_meta` the
      dataset's `DatasetMeta` (``input_shape``, ``num_classes``).
    - ``init_params(rng) -> dict[str, np.ndarray]``: the variables, keyed by dotted names
      (``block1.dense.kernel``), float32 arrays. Called with ``np.random.default_rng(seed)``
      in every process: it must depend on `rng` and the config only, so the chief and every
      worker agree on names, shapes and values (the chief's copy initialises the shards).
      The names are what `train.frozen` patterns match and what checkpoints store.
    - ``loss(params, x, y, training=True, rng=rng) -> Tensor``: the mean loss of a batch, a
      scalar, computed with `asyncps.autodiff.ops` (the tape differentiates it). `params`
      holds Tensors for the trainable variables and arrays for frozen ones; `x`, `y` are
      numpy arrays (a batch of the dataset); `rng` is the worker's generator (dropout).
      It must not change `self` or `params` (graph mode traces it once and replays it).
    - ``evaluate(params, x, y) -> dict[str, float]``: metrics on held-out data, with plain
      arrays (no tape), called by the chief on the test set. ``loss`` is required;
      ``accuracy`` (classifiers) or ``mse`` (regression) is what `train.target.metric` reads.
    - `tables`: names of the variables read with `ops.gather` (embedding tables). Their
      gradients are `SparseRows` (the rows a batch touched), pushed and applied as rows;
      every other variable is dense. Informational (the gradient's type decides on the wire)
      and checked by `asyncps.models.check_model`.

    The default `loss` and `evaluate` make a classifier: define `logits(params, x, training,
    rng)` and they are the softmax cross-entropy and (loss, accuracy). A regression or any
    other model overrides `loss` and `evaluate` instead (see `LinearRegression`).
    """

    name = "model"
    tables: frozenset[str] = frozenset()  # variables read by ops.gather: sparse-row gradients

    def __init__(self, cfg=None, data_meta=None):
        self.cfg = cfg
        self.input_shape = tuple(meta_get(data_meta, "input_shape", (784,)))
        self.num_classes = int(meta_get(data_meta, "num_classes", None) or 10)  # None: a regression model

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must define init_params(rng)")

    def logits(self, params, x, training: bool = False, rng=None):
        raise NotImplementedError(f"{type(self).__name__} must define logits(params, x, training, rng), "
                                  "or loss and evaluate")

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
