"""The models, built by name from `ModelConfig`.

Every model has ``init_params(rng) -> dict[str, float32 array]`` (dotted names such as
``dense1.kernel``), ``loss(params, x, y, training, rng) -> scalar Tensor`` and
``evaluate(params, x, y) -> dict`` (``loss`` and ``accuracy``; ``mse`` for linear).
"""
from __future__ import annotations

from asyncps.worker.models.base import Model
from asyncps.worker.models.charlm import CharLM
from asyncps.worker.models.cnn import CNN
from asyncps.worker.models.linear import LinearRegression, SoftmaxRegression
from asyncps.worker.models.mlp import MLP

MODELS = {cls.name: cls for cls in (LinearRegression, SoftmaxRegression, MLP, CNN, CharLM)}


def build_model(model_cfg, data_meta) -> Model:
    """The model named by ``model_cfg.name``; `data_meta` (dict or object) gives
    ``input_shape`` (per example), ``num_classes`` and, for charlm, ``vocab_size``."""
    try:
        cls = MODELS[model_cfg.name]
    except KeyError:
        raise ValueError(f"model.name must be one of {', '.join(MODELS)}, got {model_cfg.name!r}") from None
    return cls(model_cfg, data_meta)


__all__ = ["CNN", "MLP", "MODELS", "CharLM", "LinearRegression", "Model", "SoftmaxRegression", "build_model"]
