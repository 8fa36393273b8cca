"""Reading MNIST in its original IDX format (LeCun's `train-images-idx3-ubyte` files).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in row-major order. Files may be gzip'd.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from asyncps.errors import DataError

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of a standard MNIST folder, by split and role.
IDX_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# Like mnist.pkl.gz, the last sixth of the training files (10,000 of 60,000) is the validation set.
VALID_FRACTION = 1 / 6


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally .gz) into a native-endian array of its declared shape."""
    path = Path(path)
    data = _read_bytes(path)
    dtype, dims, offset = _parse_header(data, path)
    expected = offset + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: expected {expected} bytes for a {dtype.name} array of shape {dims} "
            f"(header included), got {len(data)}; the file is truncated or not IDX"
        )
    values = np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such IDX file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None


def _parse_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, dims, offset of the first value) from the header, or raise DataError."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>, got {data[:4].hex(' ')})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (expected one of {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions (expected at least 1)")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file has only {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    return _IDX_DTYPES[code], dims, offset


def find_idx_file(folder: Path, stem: str) -> Path:
    """The file for `stem` in `folder`: plain or .gz, with '-idx' or '.idx' (both names circulate)."""
    dotted = stem.replace("-idx", ".idx")
    candidates = [folder / (name + ext) for name in (stem, dotted) for ext in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: no MNIST IDX file {stem} (looked for {', '.join(c.name for c in candidates)})")


def load_idx_mnist(folder: str | Path) -> dict[str, np.ndarray]:
    """Load an MNIST folder of IDX files as the arrays of the mnist npz cache.

    Images become float32 rows in [0, 1] (pixel / 255), labels int64. The last sixth of the
    training files is split off as the validation set, as in mnist.pkl.gz.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.path must be a folder of MNIST IDX files (or a mnist.pkl.gz file)")
    x_all, y_all = _load_idx_pair(folder, "train")
    x_test, y_test = _load_idx_pair(folder, "test")
    n_train = len(x_all) - int(len(x_all) * VALID_FRACTION)
    return {
        "x_train": x_all[:n_train], "y_train": y_all[:n_train],
        "x_valid": x_all[n_train:], "y_valid": y_all[n_train:],
        "x_test": x_test, "y_test": y_test,
    }


def _load_idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the images and labels files of one split."""
    images_path = find_idx_file(folder, IDX_STEMS[split, "images"])
    labels_path = find_idx_file(folder, IDX_STEMS[split, "labels"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (n, rows, cols), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: expected labels 0-9, found {int(labels.max())}")
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    return x, labels.astype(np.int64)
