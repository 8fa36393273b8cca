"""The launch-time check of a user's model and data names (``module:attr``), before anything starts.

It lives above the shared layer because it looks the factories up in the worker's registries
(asyncps.worker.models, asyncps.worker.data); the resolving itself is asyncps.imports'.
"""
from __future__ import annotations

from asyncps.config import is_import_path
from asyncps.imports import accepts, check_call


def preflight(cfg) -> None:
    """Resolves a user's model.name and data.name (import, type, the options against the
    signature) without building anything: what `asyncps launch`, `asyncps train` and
    `asyncps.launch` check before any process starts, so a wrong name is one line here and not
    one per process."""
    # The registries import numpy and every model and loader: only for a user's names, so that
    # `asyncps launch` of a built-in model starts its processes without paying for them.
    if is_import_path(cfg.model.name):
        from asyncps.worker.models import model_factory

        check_call(model_factory(cfg.model.name), cfg.model.name, "model.name", (cfg.model, None),
                   dict(cfg.model.options), "model")
    if is_import_path(cfg.data.name):
        from asyncps.worker.data import data_factory

        factory = data_factory(cfg.data.name)
        options = dict(cfg.data.options)
        if "seed" not in options and accepts(factory, "seed"):
            options["seed"] = cfg.seed
        check_call(factory, cfg.data.name, "data.name", (), options, "data")
