"""The models, built from `ModelConfig`: a built-in by name, or a user's by import path.

Every model follows the `Model` contract (see its docstring): ``init_params(rng) -> dict[str,
float32 array]`` (dotted names such as ``dense1.kernel``), ``loss(params, x, y, training, rng)
-> scalar Tensor``, ``evaluate(params, x, y) -> dict`` (``loss`` and ``accuracy``; ``mse`` for
linear) and `tables`. The public face for users is `asyncps.models`.
"""
from __future__ import annotations

from asyncps.config import is_import_path
from asyncps.errors import UserError
from asyncps.worker.models.base import Model
from asyncps.worker.models.charlm import CharLM
from asyncps.worker.models.check import check_model
from asyncps.worker.models.cnn import CNN
from asyncps.worker.models.ctr import CTR
from asyncps.worker.models.ctr_deep import CTRDeep
from asyncps.worker.models.ctr_lr import CTRLogistic
from asyncps.worker.models.linear import LinearRegression, SoftmaxRegression
from asyncps.worker.models.mlp import MLP

MODELS = {cls.name: cls for cls in (LinearRegression, SoftmaxRegression, MLP, CNN, CharLM, CTR, CTRLogistic,
                                       CTRDeep)}


def build_model(model_cfg, data_meta) -> Model:
    """The model ``model_cfg.name`` names; `data_meta` (dict or object) gives ``input_shape``
    (per example), ``num_classes`` and, for charlm, ``vocab_size``.

    A built-in name builds that class; an import path ``module:attr`` (a `Model` subclass, or
    a function returning a Model) is resolved by `asyncps.imports.resolve` and called as
    ``attr(model_cfg, data_meta, **model_cfg.options)``. Every failure is one line
    (ConfigError / UserError).
    """
    name = model_cfg.name
    if is_import_path(name):
        return _user_model(model_cfg, data_meta)
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"model.name must be one of {', '.join(MODELS)} or an import path module:attr, "
                         f"got {name!r}") from None
    return cls(model_cfg, data_meta)


def model_factory(spec: str):
    """The Model subclass (or function) an import path names; one-line UserError otherwise."""
    from asyncps.imports import resolve

    factory = resolve(spec, "model.name")
    if isinstance(factory, type) and not issubclass(factory, Model):
        raise UserError(f"model.name {spec}: {factory.__module__}.{factory.__qualname__} is not a subclass of "
                        "asyncps.models.Model")
    if not callable(factory):
        raise UserError(f"model.name {spec}: a {type(factory).__name__}, not a Model subclass or a function "
                        "returning a Model")
    return factory


def _user_model(model_cfg, data_meta) -> Model:
    from asyncps.imports import call_factory

    spec = model_cfg.name
    model = call_factory(model_factory(spec), spec, "model.name", (model_cfg, data_meta), dict(model_cfg.options),
                         "model")
    if not isinstance(model, Model):
        raise UserError(f"model.name {spec}: returned {type(model).__name__}, not an asyncps.models.Model")
    return model


__all__ = ["CNN", "MLP", "MODELS", "CharLM", "LinearRegression", "Model", "SoftmaxRegression", "build_model",
           "check_model", "model_factory"]
