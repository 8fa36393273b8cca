"""Gradient compression with error feedback: the rounding, the residual's bookkeeping, the wire
types through the codec, and the shard that widens them back to float32."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncps.config import Config, load_config
from asyncps.errors import ConfigError
from asyncps.protos import codec, ps_pb2
from asyncps.protos.codec import BFLOAT16, SparseRows
from asyncps.ps.errors import InvalidArgument
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps.shard import Shard
from asyncps.compression import ErrorFeedback, make_compressor, quantize
from asyncps.ps_client import PSClient

KINDS = ["fp16", "bf16"]


def _quantum(m: float, kind: str) -> float:
    """The spacing of the wire type's values at magnitude `m` (one unit in the last place)."""
    bits, lowest = (10, -14) if kind == "fp16" else (7, -126)
    return 2.0 ** (max(math.floor(math.log2(m)) if m > 0 else lowest, lowest) - bits)


# ----------------------------------------------------------------------------------------------
# The rounding itself


def test_bfloat16_rounding_on_hand_values():
    x = np.array([1.0, -2.5, 1 + 2**-8, 1 + 2**-9, 1 + 3 * 2**-9, -0.0, np.inf, np.nan, 3.4e38], np.float32)
    bits = codec.bfloat16_from_float32(x).view("<u2")
    # 1+2^-8 is a tie between 1 and 1+2^-7: away from zero; 1+2^-9 down; 1+3*2^-9 up.
    assert list(bits[:7]) == [0x3F80, 0xC020, 0x3F81, 0x3F80, 0x3F81, 0x8000, 0x7F80]
    assert np.isnan(codec.widen(codec.bfloat16_from_float32(x))[7])  # NaN stays NaN (never 0)
    assert bits[8] == 0x7F80  # above bfloat16's largest: Inf, as IEEE rounding gives


def test_negative_nan_bits_stay_nan():
    x = np.array([0xFFFFFFFF, 0x7FFFFFFF], "<u4").view("<f4")  # the add would wrap these to +-0
    assert np.isnan(codec.widen(codec.bfloat16_from_float32(x))).all()


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
                  elements=st.floats(-2.0**100, 2.0**100, width=32)))
def test_bfloat16_is_the_nearest_of_its_two_neighbours(x):
    y = codec.widen(codec.bfloat16_from_float32(x)).astype(np.float64)
    assert y.shape == x.shape
    down = (x.view("<u4") & np.uint32(0xFFFF0000)).view("<f4").astype(np.float64)  # toward zero
    up = down + np.sign(x) * np.array([_quantum(abs(v), "bf16") if v else 0 for v in np.ravel(x)]).reshape(x.shape)
    assert np.all((y == down) | (y == up))
    assert np.all(np.abs(y - x) <= np.abs(up - down) / 2)


# ----------------------------------------------------------------------------------------------
# Error feedback


def test_error_feedback_on_hand_values_bf16():
    """g = 1 + 2^-10 each step: plain rounding sends 1.0 forever; error feedback carries the
    2^-10 until it adds up to half a quantum (2^-8, a tie: rounded up to 1 + 2^-7)."""
    ef = ErrorFeedback("bf16")
    g = {"w": np.array([1 + 2**-10], np.float32)}
    sent = [float(codec.widen(ef(g)["w"])[0]) for _ in range(4)]
    assert sent == [1.0, 1.0, 1.0, 1 + 2**-7]
    assert ef.residual["w"][0] == 4 * 2**-10 - 2**-7  # = -2^-8: the sum is exact up to it
    assert quantize(g["w"], "bf16").view("<u2")[0] == 0x3F80  # without feedback: 1.0, always


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3.0, 3.0, width=32), min_size=1, max_size=60), st.integers(-12, 2))
def test_sum_of_sent_values_tracks_sum_of_gradients_within_one_quantum(kind, steps, scale):
    ef = ErrorFeedback(kind)
    sent = true = 0.0
    for v in steps:
        g = np.float32(v * 2.0**scale)
        a = float(g + ef.residual.get("w", np.zeros(1, np.float32))[0])  # what this push rounds
        true += float(g)
        sent += float(codec.widen(ef({"w": np.array([g], np.float32)})["w"])[0])
        assert abs(ef.residual["w"][0]) <= _quantum(abs(a), kind) / 2  # rounding to nearest
    e = float(ef.residual["w"][0])
    slack = 2**-23 * sum(abs(v) * 2.0**scale for v in steps) + 1e-37  # float32 rounding of g + e
    assert abs((true - sent) - e) <= slack  # what was not sent is the residual: within one quantum


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
                  elements=st.floats(-8192.0, 8192.0, width=32)))
def test_each_push_splits_exactly_into_sent_value_and_residual(kind, g):
    ef = ErrorFeedback(kind)
    ef({"w": g * np.float32(0.37)})  # some residual to start from
    before = ef.residual["w"].astype(np.float64)
    q = ef({"w": g})["w"]
    assert q.dtype == (np.float16 if kind == "fp16" else BFLOAT16) and q.shape == g.shape
    a = (before.astype(np.float32) + g).astype(np.float64)  # the worker's float32 g + e
    np.testing.assert_array_equal(codec.widen(q).astype(np.float64) + ef.residual["w"], a)


def test_fp16_saturates_and_keeps_the_excess():
    ef = ErrorFeedback("fp16")
    q = ef({"w": np.array([1e5, -7e4, 1.0], np.float32)})["w"]
    np.testing.assert_array_equal(q, np.array([65504, -65504, 1.0], np.float16))  # never Inf
    np.testing.assert_array_equal(ef.residual["w"], [1e5 - 65504, -7e4 + 65504, 0])
    q = ef({"w": np.zeros(3, np.float32)})["w"]
    np.testing.assert_array_equal(q, np.array([1e5 - 65504, -7e4 + 65504, 0], np.float16))


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_gradient_travels_and_resets_the_residual(kind):
    ef = ErrorFeedback(kind)
    ef({"w": np.full(4, 1 + 2**-12, np.float32)})
    q = ef({"w": np.array([1.0, np.nan, np.inf, 2.0], np.float32)})["w"]
    wide = codec.widen(q)
    assert np.isnan(wide[1]) and np.isinf(wide[2])  # the shard will reject this push
    np.testing.assert_array_equal(ef.residual["w"], np.zeros(4, np.float32))


def test_sparse_rows_sum_duplicates_and_keep_a_residual_per_row():
    ef = ErrorFeedback("bf16")
    tiny = 2**-10
    g = SparseRows(np.array([3, 1, 3]), np.array([[1.0], [1 + tiny], [tiny]], np.float32), (5, 1))
    q = ef({"emb": g})["emb"]
    np.testing.assert_array_equal(q.rows, [1, 3])
    np.testing.assert_array_equal(codec.widen(q.values), [[1.0], [1.0]])
    np.testing.assert_array_equal(ef.residual["emb"][:, 0], [0, tiny, 0, tiny, 0])
    q = ef({"emb": SparseRows(np.array([1]), np.array([[2**-8 - tiny]], np.float32), (5, 1))})["emb"]
    np.testing.assert_array_equal(codec.widen(q.values), [[2**-8]])  # row 1's residual went out with it
    assert ef.residual["emb"][3, 0] == tiny  # row 3's waits for row 3's next gradient


def test_other_dtypes_pass_through_and_none_means_no_compressor():
    assert make_compressor("none") is None
    g = np.ones(3, np.float64)
    assert make_compressor("bf16")({"w": g})["w"] is g
    with pytest.raises(ValueError, match="cluster.compression"):
        make_compressor("int8")


def test_config_rejects_an_unknown_compression():
    with pytest.raises(ConfigError, match="cluster.compression must be one of none, fp16, bf16, got 'zstd'"):
        load_config("configs/mnist_mlp.yaml", ["cluster.compression=zstd"])
    assert load_config("configs/mnist_mlp.yaml", ["cluster.compression=fp16"]).cluster.compression == "fp16"


# ----------------------------------------------------------------------------------------------
# The wire and the shard


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["float16", "bfloat16"]),
       hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9), st.integers(1, 200))
def test_16_bit_tensors_round_trip_through_the_codec(dtype, shape, chunk_bytes):
    bits = np.random.default_rng(0).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    value = bits.view(np.float16 if dtype == "float16" else BFLOAT16).reshape(shape)
    for wire in (list(codec.encode_wire({"g": value}, b"", chunk_bytes)), [codec.encode_message({"g": value})]):
        asm = codec.Assembler()
        for m in wire:
            asm.add_wire(m)
        out = asm.finish()["g"]
        assert out.dtype == value.dtype and out.shape == value.shape and out.tobytes() == value.tobytes()
        assert ps_pb2.PushChunk.FromString(wire[0]).tensors[0].dtype == dtype  # the tag on the wire


def _shard() -> Shard:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers = 1, 1
    cfg.optimizer.learning_rate = 1.0
    shard = Shard(cfg)
    shard.init({"w": np.zeros((2, 3), np.float32), "emb": np.zeros((4, 2), np.float32)})
    shard.register_worker(0)
    return shard


def test_shard_widens_16_bit_gradients_of_a_float32_variable():
    shard = _shard()
    g = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    shard.push(0, 0, 0, {"w": g.astype(np.float16)})
    shard.push(0, 1, 1, {"w": codec.bfloat16_from_float32(g),
                         "emb": SparseRows(np.array([2]), codec.bfloat16_from_float32(np.ones((1, 2), np.float32)))})
    _, values = shard.pull(None)
    np.testing.assert_array_equal(values["w"], -2 * g)
    np.testing.assert_array_equal(values["emb"][2], [-1, -1])
    assert values["w"].dtype == np.float32


def test_shard_rejects_a_float16_gradient_that_overflowed_naming_the_variable():
    shard = _shard()
    with np.errstate(over="ignore"):  # the overflow is the point
        bad = np.array([[1, 2, 3], [4, 5, 70000]], np.float32).astype(np.float16)  # 70000 -> Inf
    with pytest.raises(InvalidArgument, match=r"variable 'w': 1 non-finite value\(s\) \(NaN or Inf, sent as float16\)"):
        shard.push(0, 0, 0, {"w": bad})
    _, values = shard.pull(None)
    assert shard.version == 0 and not values["w"].any()
    assert shard.stats()["workers"][0]["rejected"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_pushes_through_grpc_track_the_uncompressed_sum(kind):
    """PSClient with cluster.compression, against a real shard: SGD with lr 1 subtracts the sum
    of what was sent, which differs from the true sum by the worker's residual only."""
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 2, 1, 10.0
    cfg.cluster.compression = kind
    cfg.optimizer.learning_rate = 1.0
    params = {"w": np.zeros((64, 8), np.float32), "b": np.zeros(8, np.float32)}
    servers = [ShardServer(cfg, i) for i in range(2)]
    placement = place({n: (a.shape, a.dtype) for n, a in params.items()}, 2, split_bytes=512)
    client = PSClient([f"127.0.0.1:{s.start()}" for s in servers], placement, cfg)
    rng = np.random.default_rng(1)
    try:
        client.init(params)
        client.register(0)
        _, versions = client.pull(worker=0)
        total = {n: np.zeros_like(a, dtype=np.float64) for n, a in params.items()}
        for seq in range(20):
            grads = {n: (rng.standard_normal(a.shape) * 1e-3).astype(np.float32) for n, a in params.items()}
            for n, g in grads.items():
                total[n] += g
            results, values, versions = client.push_pull(grads, versions, 0, seq)
            assert {r.result for r in results} == {"APPLIED"}
        residual = client._compress.residual
        for n in params:
            np.testing.assert_allclose(-values[n] + residual[n], total[n], rtol=0, atol=1e-7)
            assert np.abs(residual[n]).max() <= _quantum(np.abs(total[n]).max() + 1e-3, kind)
    finally:
        client.close()
        for s in servers:
            s.stop(0)


def test_float16_conversions_agree_with_numpy():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    wide = codec.float32_from_float16(every)
    np.testing.assert_array_equal(wide.view("<u4")[np.isfinite(every)], every[np.isfinite(every)].astype(np.float32).view("<u4"))
    assert np.isnan(wide[np.isnan(every)]).all() and np.array_equal(np.isinf(wide), np.isinf(every))
    finite = every[np.isfinite(every)]
    assert np.array_equal(codec.float16_from_float32(finite.astype(np.float32)).view("<u2"), finite.view("<u2"))
    rng = np.random.default_rng(0)
    for scale in (1e-9, 1e-6, 3e-5, 1e-3, 1.0, 1e3):  # float16 subnormals, normals, near the top
        x = np.clip(rng.standard_normal(20000) * scale, -65504, 65504).astype(np.float32)
        ours, numpy = codec.float16_from_float32(x).astype(np.float64), x.astype(np.float16).astype(np.float64)
        differ = ours != numpy  # only at exact ties (numpy: to even; ours: away from zero)
        np.testing.assert_array_equal(np.abs(ours - x)[differ], np.abs(numpy - x)[differ])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_compressed_cluster_converges_and_nothing_is_rejected(tmp_path, kind):
    """`asyncps launch` with cluster.compression: y = 2x is learned as without it, and the shards
    accept every 16-bit push."""
    from cli_runner import CONFIGS, report, run_ok

    run_ok("launch", str(CONFIGS / "linear_regression.yaml"), f"run_dir={tmp_path}", "cluster.workers=2",
           f"cluster.compression={kind}", timeout=120)
    r = report(tmp_path)
    assert abs(r["variables"]["linear.w"][0] - 2) < 0.02 and abs(r["variables"]["linear.b"][0]) < 0.05
    assert r["pushes"]["rejected"] == 0 and r["pushes"]["applied"] > 0
