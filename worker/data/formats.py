"""Users' own data: arrays checked into a Dataset, and the `npz` and `csv` file formats.

The rules every path into a Dataset shares (`dataset_from_arrays`):

- x: numeric, at least 1-D (first axis: examples), converted to float32 (integer ids stay exact
  below 2**24; a model that gathers casts them back with ``x.astype(np.int64)``);
- y: integers or booleans -> class ids (int64, 0 or more; `num_classes` = the largest + 1 unless
  given); floats -> regression targets (float32, `num_classes` None);
- as many labels as inputs, train and test with the same per-example shapes, at least one
  example each, every value finite.

Each failure is one DataError line naming the file (or the function) and the array.
"""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from asyncps.errors import DataError

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def dataset_from_arrays(x_train, y_train, x_test, y_test, *, name: str = "data", num_classes: int | None = None,
                        vocab=None, where: str | None = None):
    """A validated `Dataset` (see the module docstring for the rules); `where` prefixes errors."""
    from asyncps.worker.data import Dataset, DatasetMeta

    where = where or name
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for key, value in arrays.items():
        arrays[key] = _numeric(value, key, where)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 1 or len(x) == 0:
            raise DataError(f"{where}: x_{split} must hold at least one example (shape (n, ...)), got shape {x.shape}")
        if y.ndim < 1 or len(y) != len(x):
            raise DataError(f"{where}: y_{split} must hold one label per example ({len(x)}), got shape {y.shape}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{where}: x_train and x_test must have the same per-example shape, got "
                        f"{arrays['x_train'].shape[1:]} and {arrays['x_test'].shape[1:]}")
    classes = [arrays[k].dtype.kind in "iub" for k in ("y_train", "y_test")]
    if classes[0] != classes[1]:
        raise DataError(f"{where}: y_train and y_test must both be integers (class ids) or both floats "
                        f"(regression), got {arrays['y_train'].dtype} and {arrays['y_test'].dtype}")
    if arrays["y_train"].shape[1:] != arrays["y_test"].shape[1:]:
        raise DataError(f"{where}: y_train and y_test must have the same per-example shape, got "
                        f"{arrays['y_train'].shape[1:]} and {arrays['y_test'].shape[1:]}")
    for key in ("x_train", "x_test"):
        arrays[key] = _float32(arrays[key], key, where)
    if classes[0]:
        for key in ("y_train", "y_test"):
            y = arrays[key].astype(np.int64)
            if y.ndim != 1:
                raise DataError(f"{where}: {key} holds class ids, so it must be 1-D (n,), got shape {y.shape}")
            if y.min() < 0:
                raise DataError(f"{where}: {key} holds class ids, which must be 0 or more, got {int(y.min())}")
            arrays[key] = y
        top = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
        if num_classes is None:
            num_classes = top
        elif top > num_classes:
            raise DataError(f"{where}: labels go up to {top - 1}, more than num_classes={num_classes} allows")
    else:
        for key in ("y_train", "y_test"):
            arrays[key] = _float32(arrays[key], key, where)
        num_classes = None
    meta = DatasetMeta(name, tuple(int(d) for d in arrays["x_train"].shape[1:]), num_classes=num_classes,
                       vocab=list(vocab) if vocab is not None else None)
    return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], meta)


def check_dataset(data, where: str):
    """`data` (what a user's loader returned) as a validated Dataset, or a one-line DataError."""
    from asyncps.worker.data import Dataset, DatasetMeta

    if not isinstance(data, Dataset):
        raise DataError(f"{where} returned {type(data).__name__}, not an asyncps.data.Dataset "
                        "(Dataset.from_arrays(x_train, y_train, x_test, y_test) makes one)")
    meta = data.meta
    if not isinstance(meta, DatasetMeta):
        raise DataError(f"{where}: Dataset.meta must be an asyncps.data.DatasetMeta, got {type(meta).__name__}")
    checked = dataset_from_arrays(data.x_train, data.y_train, data.x_test, data.y_test, name=meta.name,
                                  num_classes=meta.num_classes if meta.num_classes else None, vocab=meta.vocab,
                                  where=where)
    if tuple(meta.input_shape) != checked.meta.input_shape:
        raise DataError(f"{where}: meta.input_shape {tuple(meta.input_shape)} is not the shape of one example of "
                        f"x_train {checked.meta.input_shape}")
    checked.x_valid, checked.y_valid = data.x_valid, data.y_valid
    return checked


def load_npz(path: str | Path, name: str = "npz"):
    """A Dataset from an ``.npz`` holding x_train, y_train, x_test, y_test (np.savez); loaded with
    allow_pickle=False, so object arrays are refused, never unpickled."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"data.path {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"data.path {path}: a directory, not an .npz file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"data.path {path}: not a readable .npz file ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"data.path {path}: a single .npy array, expected an .npz archive of {', '.join(NPZ_ARRAYS)}")
    with z:
        missing = [k for k in NPZ_ARRAYS if k not in z.files]
        if missing:
            raise DataError(f"data.path {path}: missing array {missing[0]} (an npz dataset holds "
                            f"{', '.join(NPZ_ARRAYS)}; it has {', '.join(z.files) or 'none'})")
        arrays = {}
        for key in NPZ_ARRAYS:
            try:
                arrays[key] = z[key]
            except ValueError as exc:  # object arrays need pickle: refused
                raise DataError(f"data.path {path}: {key} cannot be read without pickle ({exc}); "
                                "save numeric arrays") from None
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise DataError(f"data.path {path}: {key} is truncated or corrupt ({exc})") from None
    return dataset_from_arrays(*(arrays[k] for k in NPZ_ARRAYS), name=name, where=f"data.path {path}")


def load_csv(path: str | Path, test_path: str | Path, label=None, name: str = "csv"):
    """A Dataset from two CSV files of numeric columns (train and test, the same columns).

    A first row with any non-numeric cell is a header. `label`: the label column, a header name
    or a 0-based index (negative counts from the end); None is the last column. The other
    columns are the features (float32). Labels that are all whole numbers are class ids, any
    other labels regression targets.
    """
    train_header, train = _read_csv(Path(path), "data.path")
    test_header, test = _read_csv(Path(test_path), "data.test_path")
    if train.shape[1] != test.shape[1]:
        raise DataError(f"data.test_path {test_path}: {test.shape[1]} columns, but data.path {path} has {train.shape[1]}")
    if train_header and test_header and train_header != test_header:
        raise DataError(f"data.test_path {test_path}: its header differs from data.path {path}'s")
    column = _label_column(label, train_header or test_header, train.shape[1], path)
    if train.shape[1] < 2:
        raise DataError(f"data.path {path}: needs a label column and at least one feature column, got 1 column")
    y_train, y_test = train[:, column], test[:, column]
    x_train, x_test = np.delete(train, column, axis=1), np.delete(test, column, axis=1)
    if np.all(y_train == np.round(y_train)) and np.all(y_test == np.round(y_test)):
        y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    return dataset_from_arrays(x_train, y_train, x_test, y_test, name=name, where=f"data.path {path}")


def _label_column(label, header: list[str] | None, width: int, path) -> int:
    if label is None:
        return width - 1
    if isinstance(label, str):
        if header is None:
            raise DataError(f"data.label {label!r}: {path} has no header row, so name the column by its index "
                            f"(0..{width - 1})")
        if label not in header:
            raise DataError(f"data.label {label!r}: no such column in {path} (columns: {', '.join(header)[:200]})")
        return header.index(label)
    if not -width <= label < width:
        raise DataError(f"data.label {label}: {path} has {width} columns (indices 0..{width - 1}, or negative from the end)")
    return label % width


def _read_csv(path: Path, key: str) -> tuple[list[str] | None, np.ndarray]:
    """(header or None, float64 array of shape (rows, columns)); a one-line DataError naming the
    row and column of the first cell that is not a number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{key} {path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{key} {path}: a directory, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{key} {path}: not UTF-8 text (byte offset {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{key} {path}: cannot read ({exc.strerror})") from None
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DataError(f"{key} {path}: empty, expected rows of comma-separated numbers")
    header_cells = next(csv.reader([lines[first]]))
    header = None
    if not all(_is_number(c) for c in header_cells):
        header = [c.strip() for c in header_cells]
        first += 1
    body = "\n".join(lines[first:])
    if not body.strip():
        raise DataError(f"{key} {path}: a header but no rows of numbers")
    try:
        rows = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        _raise_first_bad_cell(lines, first, key, path)
        raise DataError(f"{key} {path}: rows of comma-separated numbers of equal length expected") from None
    if header is not None and rows.shape[1] != len(header):
        raise DataError(f"{key} {path}: the header has {len(header)} columns, the rows {rows.shape[1]}")
    if not np.all(np.isfinite(rows)):
        r, c = np.argwhere(~np.isfinite(rows))[0]
        raise DataError(f"{key} {path}: row {first + r + 1} column {c + 1} is {rows[r, c]}, expected a finite number")
    return header, rows


def _raise_first_bad_cell(lines: list[str], first: int, key: str, path: Path) -> None:
    width = None
    for number, cells in enumerate(csv.reader(lines[first:]), start=first + 1):
        if not cells or not any(c.strip() for c in cells):
            continue
        for col, cell in enumerate(cells, start=1):
            if not _is_number(cell):
                raise DataError(f"{key} {path}: row {number} column {col} is {cell.strip()[:40]!r}, expected a number")
        width = len(cells) if width is None else width
        if len(cells) != width:
            raise DataError(f"{key} {path}: row {number} has {len(cells)} columns, the rows before it {width}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _numeric(value, key: str, where: str) -> np.ndarray:
    try:
        a = np.asarray(value)
    except Exception as exc:
        raise DataError(f"{where}: {key} is not an array ({type(exc).__name__})") from None
    if a.dtype.kind not in "biuf":
        raise DataError(f"{where}: {key} must be numeric (float, int or bool), got dtype {a.dtype}")
    return a


def _float32(a: np.ndarray, key: str, where: str) -> np.ndarray:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise DataError(f"{where}: {key} has non-finite values (nan or inf)")
    out = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise DataError(f"{where}: {key} has values too large for float32")
    return out
