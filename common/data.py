"""The public data interface: what a user's loader returns, and the built-in file formats.

A data loader is a function named in the YAML by its import path (docs/own_model.md)::

    data:
      name: my_model.data:load       # module:attr
      n: 2000                        # every other key: a keyword argument of load

called in every process of a run as ``load(n=2000)`` (plus ``seed=`` the run's seed when it has
a `seed` parameter the config leaves out); it returns a `Dataset`, best built with
`Dataset.from_arrays(x_train, y_train, x_test, y_test)`, which checks and converts the arrays.
It must return the same arrays in every process (draw only from the seed it is given).

Sharding: every process holds the whole dataset; `BatchStream` gives worker i of M its own
part of a seeded permutation of the training set, reshuffled each epoch, as a pure function of
(seed, i, M, step), so a restarted worker reads exactly what it would have read. The chief
scores the model on all of x_test, y_test.

Built-in formats for your files, without code: ``data: {name: npz, path: f.npz}`` (arrays
x_train, y_train, x_test, y_test: `load_npz`) and ``data: {name: csv, path: train.csv,
test_path: test.csv, label: price}`` (`load_csv`). MNIST as IDX files: ``{name: mnist, path: DIR}``.

This module re-exports pieces of `asyncps.worker.data`; the rest of that package is internal.
"""
from asyncps.worker.data import BatchStream, Dataset, DatasetMeta, load_csv, load_dataset, load_npz, shard_indices

__all__ = ["BatchStream", "Dataset", "DatasetMeta", "load_csv", "load_dataset", "load_npz", "shard_indices"]
