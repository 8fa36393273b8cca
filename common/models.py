"""The public API for writing a model: the `Model` base class, initialisers and small helpers.

A model is a `Model` subclass named in the YAML by its import path (docs/own_model.md)::

    model:
      name: my_model.model:ResidualMLP    # module:attr, found on PYTHONPATH or in the current directory
      width: 128                          # every other key: a keyword argument of ResidualMLP

and built in every process of a run as ``ResidualMLP(cfg, data_meta, width=128)``. What it must
define is stated once, in `Model`'s docstring: `init_params`, `loss` (or `logits` for a
classifier), `evaluate`, `tables`. `check_model` runs that contract on a few examples.

Initialisers (float32, from the rng they are given, so every process draws the same values):
`he_normal` (ReLU layers), `glorot_uniform`, `zeros`, `ones`; `dense_params` / `dense` make and
apply a ``name.kernel``, ``name.bias`` layer; `batches` slices an evaluation into chunks.

This module re-exports pieces of `asyncps.worker.models`; the rest of that package is internal.
"""
from asyncps.worker.models import build_model, check_model
from asyncps.worker.models.base import (Model, batches, dense, dense_params, glorot_uniform, he_normal, meta_get,
                                        ones, zeros)

__all__ = ["Model", "batches", "build_model", "check_model", "dense", "dense_params", "glorot_uniform", "he_normal",
           "meta_get", "ones", "zeros"]
