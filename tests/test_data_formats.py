"""Users' own data files: data.name npz and csv, and Dataset.from_arrays (worker/data/formats.py)."""
from __future__ import annotations

import numpy as np
import pytest

import asyncps
from asyncps.config import DataConfig, from_dict
from asyncps.data import Dataset, load_csv, load_npz
from asyncps.errors import ConfigError, DataError
from asyncps.worker.data import load_dataset


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def arrays(n=40, m=10, d=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.standard_normal((n, d)), "y_train": rng.integers(0, classes, n),
            "x_test": rng.standard_normal((m, d)), "y_test": rng.integers(0, classes, m)}


def write_npz(path, **a):
    np.savez(path, **a)
    return path


# ------------------------------------------------------------------------------------------ npz


def test_npz_loads_with_the_dtypes_and_meta_a_model_needs(tmp_path):
    a = arrays()
    a["y_train"][0] = 3  # num_classes is the largest label + 1
    data = load_dataset(DataConfig(name="npz", path=str(write_npz(tmp_path / "d.npz", **a))))
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.meta.input_shape == (3,) and data.meta.num_classes == 4 and data.meta.name == "npz"
    np.testing.assert_allclose(data.x_train, a["x_train"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test, a["y_test"])


def test_npz_float_labels_are_regression_and_images_keep_their_shape(tmp_path):
    rng = np.random.default_rng(1)
    path = write_npz(tmp_path / "r.npz", x_train=rng.random((20, 4, 4, 1)), y_train=rng.random(20),
                     x_test=rng.random((5, 4, 4, 1)), y_test=rng.random(5))
    data = load_npz(path)
    assert data.meta.num_classes is None and data.y_train.dtype == np.float32
    assert data.meta.input_shape == (4, 4, 1)


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.pop("y_test"), "missing array y_test"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train must hold one label per example (40)"),
    (lambda a: a.update(x_test=np.zeros((10, 5))), "x_train and x_test must have the same per-example shape"),
    (lambda a: a.update(x_train=np.array(["a"] * 40)), "x_train must be numeric"),
    (lambda a: a.update(x_train=np.full((40, 3), np.nan)), "x_train has non-finite values"),
    (lambda a: a.update(y_train=-np.ones(40, dtype=int)), "y_train holds class ids, which must be 0 or more"),
    (lambda a: a.update(y_test=np.zeros(10)), "both be integers (class ids) or both floats"),
    (lambda a: a.update(x_train=np.zeros((0, 3)), y_train=np.zeros(0, dtype=int)), "at least one example"),
    (lambda a: a.update(y_train=np.zeros((40, 2), dtype=int)), "y_train and y_test must have the same per-example"),
    (lambda a: a.update(y_train=np.zeros((40, 2), dtype=int), y_test=np.zeros((10, 2), dtype=int)),
     "y_train holds class ids, so it must be 1-D"),
])
def test_npz_problems_are_one_line_naming_the_file_and_array(tmp_path, change, expected):
    a = arrays()
    change(a)
    path = write_npz(tmp_path / "bad.npz", **a)
    with pytest.raises(DataError) as info:
        load_npz(path)
    message = one_line(info)
    assert expected in message and str(path) in message


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path):
    a = arrays()
    a["x_train"] = np.array([{"evil": 1}] * 40, dtype=object)
    path = tmp_path / "pickle.npz"
    np.savez(path, **a)  # allow_pickle defaults to True when saving
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert "without pickle" in one_line(info)


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    (b"not a zip file at all", "not a readable .npz file"),
    ("npy", "a single .npy array"),
    ("dir", "a directory"),
])
def test_npz_unreadable_files_are_one_line(tmp_path, content, expected):
    path = tmp_path / "x.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert expected in one_line(info)


def test_npz_and_csv_need_their_paths_in_the_config():
    with pytest.raises(ConfigError, match="data.path must name the npz file"):
        from_dict({"data": {"name": "npz"}})
    with pytest.raises(ConfigError, match="data.test_path must name the test CSV file"):
        from_dict({"data": {"name": "csv", "path": "train.csv"}})
    with pytest.raises(ConfigError, match="unknown key data.columns"):
        from_dict({"data": {"name": "csv", "path": "a", "test_path": "b", "columns": 3}})


# ------------------------------------------------------------------------------------------ csv


def write(path, text):
    path.write_text(text)
    return path


def test_csv_with_a_header_and_a_named_label(tmp_path):
    train = write(tmp_path / "train.csv", "a,label,b\n1,0,2\n3,1,4\n5,2,6\n")
    test = write(tmp_path / "test.csv", "a,label,b\n7,1,8\n")
    data = load_dataset(DataConfig(name="csv", path=str(train), test_path=str(test), label="label"))
    np.testing.assert_array_equal(data.x_train, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(data.y_train, [0, 1, 2])
    assert data.y_train.dtype == np.int64 and data.x_train.dtype == np.float32
    assert data.meta.num_classes == 3 and data.meta.input_shape == (2,)


def test_csv_without_a_header_label_by_index_default_last(tmp_path):
    train = write(tmp_path / "train.csv", "0.5,1.5,2.25\n1,2,3.5\n")
    test = write(tmp_path / "test.csv", "\n4,5,6.75\n")
    last = load_csv(train, test)  # label: None -> the last column; fractional labels -> regression
    assert last.meta.num_classes is None and last.y_train.dtype == np.float32
    np.testing.assert_allclose(last.y_train, [2.25, 3.5])
    first = load_csv(train, test, label=0)
    np.testing.assert_allclose(first.x_train, [[1.5, 2.25], [2, 3.5]])
    np.testing.assert_allclose(load_csv(train, test, label=-3).y_test, [4.0])


@pytest.mark.parametrize("train, test, label, expected", [
    ("1,2\n3,x\n", "1,2\n", None, "row 2 column 2 is 'x', expected a number"),
    ("1,2\n3,4,5\n", "1,2\n", None, "row 2 has 3 columns, the rows before it 2"),
    ("1,2\n", "1,2,3\n", None, "3 columns, but data.path"),
    ("1,2\n", "1,2\n", "price", "has no header row, so name the column by its index"),
    ("a,b\n1,2\n", "a,b\n1,2\n", "price", "no such column"),
    ("1,2\n", "1,2\n", 5, "has 2 columns"),
    ("", "1,2\n", None, "empty, expected rows of comma-separated numbers"),
    ("a,b\n", "1,2\n", None, "a header but no rows"),
    ("1,nan\n", "1,2\n", None, "row 1 column 2 is nan, expected a finite number"),
    ("a,b\n1,2\n", "a,c\n1,2\n", None, "header differs"),
    ("1\n", "1\n", None, "needs a label column and at least one feature column"),
])
def test_csv_problems_are_one_line_naming_file_row_and_column(tmp_path, train, test, label, expected):
    train_path, test_path = write(tmp_path / "train.csv", train), write(tmp_path / "test.csv", test)
    with pytest.raises(DataError) as info:
        load_csv(train_path, test_path, label)
    assert expected in one_line(info)


def test_csv_missing_file_names_the_key(tmp_path):
    test = write(tmp_path / "test.csv", "1,2\n")
    with pytest.raises(DataError, match="data.path .*no such file"):
        load_csv(tmp_path / "nope.csv", test)
    with pytest.raises(DataError, match="data.test_path .*no such file"):
        load_csv(test, tmp_path / "nope.csv")


def test_a_csv_dataset_trains_through_the_python_api(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 400), ("test", 100)):
        x = rng.standard_normal((n, 2))
        y = (x[:, 0] + x[:, 1] > 0).astype(int)
        np.savetxt(tmp_path / f"{name}.csv", np.column_stack([x, y]), delimiter=",", header="u,v,cls", comments="")
    report = asyncps.train({"model": {"name": "softmax"},
                            "data": {"name": "csv", "path": str(tmp_path / "train.csv"),
                                     "test_path": str(tmp_path / "test.csv"), "label": "cls"}},
                           run_dir=str(tmp_path / "run"), **{"train.max_steps": 200, "train.batch_size": 20,
                                                             "train.eval_every": 0})
    assert report["steps"] == 200 and report["final"]["accuracy"] > 0.9  # a linearly separable problem


# ------------------------------------------------------------------------------ from_arrays


def test_from_arrays_fills_meta_and_checks(tmp_path):
    a = arrays(classes=3)
    data = Dataset.from_arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], name="mine", num_classes=5)
    assert data.meta.name == "mine" and data.meta.num_classes == 5 and data.meta.input_shape == (3,)
    with pytest.raises(DataError, match="labels go up to 2, more than num_classes=2"):
        Dataset.from_arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], num_classes=2)
    booleans = Dataset.from_arrays(a["x_train"], a["y_train"] > 0, a["x_test"], a["y_test"] > 0)
    assert booleans.y_train.dtype == np.int64 and booleans.meta.num_classes == 2
