"""The data layer the workers and the chief's evaluator read: one `load_dataset` for every model.

- ``mnist``: 50,000 training and 10,000 test images (float32 rows of 784 in [0, 1]), plus the
  10,000 validation images as ``x_valid, y_valid``; see `asyncps.worker.data.mnist`.
- ``linear``: y = 2x (+ noise), shapes (n, 1); see `asyncps.worker.data.synthetic`.
- ``charlm``: the previous `context` character ids -> the next one; see `asyncps.worker.data.text`.
- ``ctr``: 8 hashed categorical fields with a logistic truth; see `asyncps.worker.data.ctr`.
- ``click_logs``: Criteo-like logs (26 categorical + 13 numeric fields) with a planted model,
  whose held-out log loss and AUC are the best achievable (`Dataset.reference`); see
  `asyncps.worker.data.click_logs`.
- ``criteo``: the Criteo display-advertising TSV format, streamed; see `asyncps.worker.data.criteo`.
- ``npz``, ``csv``: a user's own files; see `asyncps.worker.data.formats`.
- an import path ``module:attr``: a user's function returning a `Dataset` (docs/own_model.md).

Every process loads the whole dataset; workers then read disjoint parts of the training set.
The public face for users is `asyncps.data`.

Per-worker batches come from `BatchStream` (`asyncps.worker.data.sharding`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncps.config import DataConfig, is_import_path
from asyncps.errors import ConfigError, UserError
from asyncps.worker.data.formats import check_dataset, dataset_from_arrays, load_csv, load_npz
from asyncps.worker.data.ctr import make_ctr
from asyncps.worker.data.mnist import default_cache_dir, load_mnist, prepare_mnist
from asyncps.worker.data.sharding import BatchId, BatchStream, shard_indices
from asyncps.worker.data.synthetic import make_linear
from asyncps.worker.data.text import Vocab, load_charlm

__all__ = [
    "BatchId", "BatchStream", "Dataset", "DatasetMeta", "Vocab", "default_cache_dir", "load_csv",
    "load_dataset", "load_npz", "prepare_mnist", "shard_indices",
]


@dataclass(frozen=True)
class DatasetMeta:
    """What a model needs to know about its data (the model gets it as `data_meta`)."""

    name: str  # "mnist", "linear", "charlm", "npz", "csv" or a user's name
    input_shape: tuple[int, ...]  # one example's x, e.g. (784,)
    num_classes: int | None  # 10 for mnist, the vocabulary size for charlm, None for regression
    vocab: list[str] | None = None  # charlm: id -> character


@dataclass
class Dataset:
    """Training and test arrays (first axis: examples) and their `meta`; MNIST adds a validation split.

    A user's loader builds one with `Dataset.from_arrays`, which checks and converts the arrays
    (x float32; integer y class ids, float y regression targets) and fills in `meta`. Workers
    never see a different dataset: each loads all of it and `BatchStream` gives worker i of M
    its own part of the training set (a seeded permutation cut in M, reshuffled every epoch);
    the chief evaluates on all of x_test, y_test.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    meta: DatasetMeta
    x_valid: np.ndarray | None = None
    y_valid: np.ndarray | None = None
    # metrics of the data's own generating model on the test set (click_logs: the planted
    # model's log loss and AUC, the best achievable), printed beside a trained model's
    reference: dict[str, float] | None = None

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test, y_test, *, name: str = "data", num_classes: int | None = None,
                    vocab=None) -> "Dataset":
        """A checked Dataset: as many labels as examples, the same per-example shapes in train and
        test, finite numbers; x becomes float32, integer/bool y class ids (int64; `num_classes` the
        largest + 1 unless given), float y regression targets (float32, `num_classes` None).
        A problem is one DataError line naming the array."""
        return dataset_from_arrays(x_train, y_train, x_test, y_test, name=name, num_classes=num_classes,
                                   vocab=vocab, where=name)


def load_dataset(data_cfg: DataConfig, context: int = 8, *, seed: int = 0,
                 cache_dir: str | Path | None = None) -> Dataset:
    """The dataset `data_cfg` names. Every process of a run gets identical arrays.

    `context` is ``model.context`` (charlm), `seed` the run's seed (linear). The MNIST cache is
    ``data.cache_dir``, else `cache_dir` (e.g. `default_cache_dir()` read at the entry point),
    else ``$ASYNCPS_CACHE`` or ``~/.cache/asyncps``.
    """
    if is_import_path(data_cfg.name):
        return _user_data(data_cfg, seed=seed)
    # each takes the keyword arguments it needs and ignores the rest (**_)
    loaders: dict[str, Callable[..., Dataset]] = {"mnist": _mnist, "linear": _linear, "charlm": _charlm, "npz": _npz, "csv": _csv, "ctr": _ctr,
               "click_logs": _click_logs, "criteo": _criteo}
    return loaders[data_cfg.name](data_cfg, context=context, seed=seed, cache_dir=cache_dir)


def _user_data(cfg: DataConfig, *, seed: int) -> Dataset:
    """``attr(**data.options)`` (plus ``seed=`` the run's seed when it takes a `seed` the config
    does not set), resolved like model.name, and its result checked (`formats.check_dataset`)."""
    from asyncps.imports import accepts, call_factory

    spec = cfg.name
    factory = data_factory(spec)
    options = dict(cfg.options)
    if "seed" not in options and accepts(factory, "seed"):
        options["seed"] = seed
    data = call_factory(factory, spec, "data.name", (), options, "data")
    return check_dataset(data, f"data.name {spec}")


def data_factory(spec: str):
    """The loader function an import path names; one-line UserError otherwise."""
    from asyncps.imports import resolve

    factory = resolve(spec, "data.name")
    if not callable(factory):
        raise UserError(f"data.name {spec}: a {type(factory).__name__}, not a function returning a Dataset")
    return factory


def _required(path: str | None, key: str, name: str) -> str:
    """A file the config check requires for data.name `name` (a DataConfig built in code may lack it)."""
    if not path:
        raise ConfigError(f"data.{key} must name the {name} file (data.name {name}), got null")
    return path


def _npz(cfg: DataConfig, **_) -> Dataset:
    return load_npz(_required(cfg.path, "path", "npz"))


def _csv(cfg: DataConfig, **_) -> Dataset:
    return load_csv(_required(cfg.path, "path", "csv"), _required(cfg.test_path, "test_path", "csv"), cfg.label)


def _mnist(cfg: DataConfig, *, cache_dir, **_) -> Dataset:
    a = load_mnist(cfg.path, cfg.cache_dir if cfg.cache_dir is not None else cache_dir)
    meta = DatasetMeta("mnist", a["x_train"].shape[1:], num_classes=10)
    if cfg.standardize:
        a = standardized(a)
    return Dataset(a["x_train"], a["y_train"], a["x_test"], a["y_test"], meta, a["x_valid"], a["y_valid"])


def standardized(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every ``x_*`` array shifted and scaled by the training set's global pixel mean and std.

    The statistics come from ``x_train`` only, so no test information leaks into training; they
    are computed in float64 and applied in float32, identically in every process of a run.
    """
    x_train = arrays["x_train"]
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    return {key: ((value - np.float32(mean)) / np.float32(std)).astype(np.float32) if key.startswith("x_") else value
            for key, value in arrays.items()}


def _linear(cfg: DataConfig, *, seed: int, **_) -> Dataset:
    x_train, y_train, x_test, y_test = make_linear(cfg.num_train, noise=cfg.noise, seed=seed)
    return Dataset(x_train, y_train, x_test, y_test, DatasetMeta("linear", (1,), num_classes=None))


def _ctr(cfg: DataConfig, *, seed: int, **_) -> Dataset:
    x_train, y_train, x_test, y_test = make_ctr(cfg.num_train, cfg.num_test, cfg.fields, cfg.vocab, seed)
    return Dataset(x_train, y_train, x_test, y_test, DatasetMeta("ctr", (cfg.fields,), num_classes=2))


def _click_logs(cfg: DataConfig, *, seed: int, **_) -> Dataset:
    from asyncps.worker.data.click_logs import generate, spec_of
    from asyncps.worker.models.metrics import auc, log_loss

    spec = spec_of(cfg)
    train, test = generate(spec, cfg.num_train, seed, "train"), generate(spec, cfg.num_test, seed, "test")
    reference = {"loss": log_loss(test.p, test.y), "auc": auc(test.p, test.y)}
    meta = DatasetMeta("click_logs", (spec.fields + spec.numeric,), num_classes=2)
    return Dataset(train.x, train.y, test.x, test.y, meta, reference=reference)


def _criteo(cfg: DataConfig, *, seed: int, **_) -> Dataset:
    from asyncps.worker.data.criteo import load_criteo

    x_train, y_train, x_test, y_test = load_criteo(cfg.path, cfg.test_path, cfg.test_fraction, seed)
    return Dataset(x_train, y_train, x_test, y_test, DatasetMeta("criteo", (x_train.shape[1],), num_classes=2))


def _charlm(cfg: DataConfig, *, context: int, **_) -> Dataset:
    x_train, y_train, x_test, y_test, vocab = load_charlm(cfg.text, context)
    meta = DatasetMeta("charlm", (context,), num_classes=len(vocab), vocab=list(vocab.chars))
    return Dataset(x_train, y_train, x_test, y_test, meta)
