"""The tensor codec: round trips of random tensors, and clear errors for every malformed stream."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asyncps.protos import codec, ps_pb2, tensor_pb2
from asyncps.protos.codec import Assembler, CodecError, SparseRows
from wire_oracle import add, decode_stream, encode_stream

DTYPES = sorted(codec.DTYPES)


def _roundtrip(tensors, chunk_bytes):
    msgs = list(encode_stream(tensors, ps_pb2.PushChunk, chunk_bytes=chunk_bytes))
    wire = [ps_pb2.PushChunk.FromString(m.SerializeToString()) for m in msgs]
    asm = Assembler()
    for m in wire:
        add(asm, m.tensors)
    return asm.finish(), msgs


arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dtype=codec.DTYPES[dt], shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
)


@settings(max_examples=150, deadline=None)
@given(st.lists(arrays, min_size=1, max_size=4), st.integers(1, 300))
def test_roundtrip_random_dtypes_shapes_and_chunk_sizes(values, chunk_bytes):
    tensors = {f"v{i}": a for i, a in enumerate(values)}
    out, msgs = _roundtrip(tensors, chunk_bytes)
    assert list(out) == list(tensors)
    for name, a in tensors.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        assert out[name].tobytes() == a.tobytes()  # bitwise: NaNs and -0.0 included
    for m in msgs[:-1]:  # every message but the last is full, give or take one small piece
        assert sum(len(t.data) for t in m.tensors) <= chunk_bytes


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(1, 5), st.integers(1, 64))
def test_sparse_rows_roundtrip(k, width, chunk_bytes):
    rows = np.arange(k, dtype=np.int64)[::-1] * 3
    values = np.arange(k * width, dtype=np.float32).reshape(k, width)
    out, _ = _roundtrip({"emb": SparseRows(rows, values)}, chunk_bytes)
    assert isinstance(out["emb"], SparseRows)
    np.testing.assert_array_equal(out["emb"].rows, rows)
    np.testing.assert_array_equal(out["emb"].values, values)


def test_big_endian_and_noncontiguous_inputs_are_normalized():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    out, _ = _roundtrip({"a": a}, 1 << 20)
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], a)


def test_large_tensor_travels_in_about_1mib_messages():
    a = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    msgs = list(encode_stream({"a": a}, ps_pb2.PushChunk))
    assert len(msgs) == 12
    assert all(m.ByteSize() < codec.CHUNK_BYTES + 200 for m in msgs)
    np.testing.assert_array_equal(decode_stream(msgs)["a"], a)


def test_slots_are_kept_apart_from_values():
    items = [("w", "", np.ones(3, np.float32)), ("w", "m", np.zeros(3, np.float32))]
    msgs = list(encode_stream(items, ps_pb2.SnapshotChunk, chunk_bytes=5))
    asm = Assembler()
    for m in msgs:
        add(asm, m.tensors)
    assert list(asm.finish()) == ["w"] and list(asm.slots()["w"]) == ["m"]


def test_unsupported_input_dtype_is_rejected():
    with pytest.raises(CodecError, match="unsupported dtype 'complex64'"):
        list(encode_stream({"c": np.zeros(2, np.complex64)}, ps_pb2.PushChunk))


# ----------------------------------------------------------------------------------------------
# Malformed pieces: each names the tensor and the problem.


def _piece(name="w", dtype="float32", shape=(2, 3), data=None, offset=0, total=None, **kw):
    data = bytes(24) if data is None else data
    total = len(data) if total is None else total
    return tensor_pb2.Tensor(name=name, dtype=dtype, shape=shape, data=data, offset=offset, total=total, **kw)


def _assemble(*pieces):
    asm = Assembler()
    add(asm, pieces)
    return asm.finish()


@settings(max_examples=80, deadline=None)
@given(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), st.integers(-9, 9).filter(lambda d: d != 0))
def test_shape_and_byte_count_must_agree(shape, delta):
    nbytes = int(np.prod(shape)) * 4
    data = bytes(max(nbytes + delta, 0))
    if len(data) == nbytes:
        return
    with pytest.raises(CodecError, match=r"'w': \d+ bytes declared, but shape .* of float32 needs"):
        _assemble(_piece(shape=shape, data=data))


@pytest.mark.parametrize(
    "pieces, message",
    [
        ([_piece(dtype="complex64")], "unsupported dtype 'complex64'"),
        ([_piece(dtype="object")], "unsupported dtype 'object'"),
        ([_piece(shape=(2, -3))], "negative dimension"),
        ([_piece(data=bytes(8), offset=8, total=24)], "first piece starts at byte 8"),
        ([_piece(data=bytes(8), total=24), _piece(data=bytes(8), offset=16, total=24)], "piece at byte 16, expected 8"),
        ([_piece(data=bytes(8), total=24), _piece(data=bytes(20), offset=8, total=24)], "past the declared total of 24"),
        ([_piece(data=bytes(30), total=24)], "exceeds the declared total"),
        ([_piece(data=bytes(8), total=24), _piece(dtype="int32", data=bytes(8), offset=8, total=24)], "disagrees with the first"),
        ([_piece(), _piece()], "sent twice"),
        ([_piece(data=bytes(8), total=24)], r"after 8 of 24 bytes \(truncated\)"),
        ([_piece(sparse=True, rows=bytes(8))], "need 16 bytes of int64 row indices"),
    ],
)
def test_malformed_pieces_are_rejected_with_a_clear_error(pieces, message):
    with pytest.raises(CodecError, match=message):
        _assemble(*pieces)


def test_declared_size_above_limit_is_rejected_before_allocating():
    with pytest.raises(CodecError, match="exceeds the limit"):
        _assemble(_piece(shape=(1 << 40,), data=b"", total=4 << 40))


# ----------------------------------------------------------------------------------------------
# The wire fast path: the same protobuf bytes as the generated classes, parsed without copies.


@settings(max_examples=100, deadline=None)
@given(st.lists(arrays, min_size=0, max_size=4), st.integers(1, 300), st.integers(-5, 1 << 40))
def test_wire_encoding_matches_protobuf_and_round_trips(values, chunk_bytes, seq):
    tensors = {f"v{i}": a for i, a in enumerate(values)}
    header = ps_pb2.PushHeader(worker=1, seq=seq, read_version=2)
    wire = list(codec.encode_wire(tensors, header.SerializeToString(), chunk_bytes))
    reference = list(encode_stream(tensors, ps_pb2.PushChunk, chunk_bytes, first=ps_pb2.PushChunk(header=header)))
    assert [ps_pb2.PushChunk.FromString(w) for w in wire] == reference  # generated peers interoperate
    asm = Assembler()
    headers = [asm.add_wire(w) for w in wire]
    assert ps_pb2.PushHeader.FromString(headers[0]) == header and headers[1:] == [None] * (len(wire) - 1)
    out = asm.finish()
    for name, a in tensors.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape and out[name].tobytes() == a.tobytes()
    asm2 = Assembler()  # and the wire parser reads what protobuf serializes
    for m in reference:
        asm2.add_wire(m.SerializeToString())
    assert all(asm2.finish()[n].tobytes() == a.tobytes() for n, a in tensors.items())


def test_empty_header_still_travels():
    (msg,) = codec.encode_wire({}, ps_pb2.PushHeader().SerializeToString())
    assert Assembler().add_wire(msg) == b""
    (msg,) = codec.encode_wire({})
    assert Assembler().add_wire(msg) is None


@pytest.mark.parametrize("blob, message", [(b"\x12\x80", "truncated or overlong varint"), (b"\x12\x05ab", "runs past the end"),
                                           (b"\x13", "unsupported wire type")])
def test_malformed_wire_bytes_are_rejected(blob, message):
    with pytest.raises(CodecError, match=message):
        Assembler().add_wire(blob)


def test_snapshot_round_trip():
    snap = codec.Snapshot(3, {"w": np.ones(3, np.float32)}, {"w": {"m": np.zeros(3, np.float32)}}, {"w": 3}, {0: 2}, {0: 3}, "adam")
    assert repr(codec.decode_snapshot(codec.encode_snapshot(snap, chunk_bytes=5))) == repr(snap)


def test_known_tensor_entries_parse_like_new_ones():
    """The parse cache (codec._KNOWN): a repeated entry decodes to the same tensor, an entry of the
    same length with other bytes is parsed afresh, and a tensor sent twice is still an error."""
    codec._KNOWN.clear()
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(6, np.float32).reshape(3, 2)
    first = codec.encode_message({"wa": a})
    for message, expected in ((first, {"wa": a}), (first, {"wa": a}), (codec.encode_message({"wb": b}), {"wb": b})):
        assert len(message) == len(first)  # same entry length: only the bytes tell them apart
        asm = Assembler()
        asm.add_wire(message)
        out = asm.finish()
        assert list(out) == list(expected)
        for name, value in expected.items():
            assert out[name].dtype == value.dtype and out[name].shape == value.shape
            np.testing.assert_array_equal(out[name], value)
    assert sum(map(len, codec._KNOWN.values())) == 2
    with pytest.raises(CodecError, match="sent twice"):
        Assembler().add_wire(codec.encode_message([("wa", "", a), ("wa", "", a)]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=9), st.sampled_from(["float32", "float64", "int64", "float16"]),
                          hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=40)), min_size=1, max_size=5,
                unique_by=lambda t: t[0]),
       st.integers(0, 1 << 40), st.integers(0, 1 << 20))
def test_whole_tensors_are_decoded_aligned(specs, seq, worker):
    """The encoder pads varints so that each whole tensor's data starts at a multiple of
    codec.ALIGN in the message: decoded without a copy, the arrays are aligned for numpy."""
    header = ps_pb2.PushHeader(worker=worker, seq=seq).SerializeToString()  # headers of any length
    tensors = {name: np.ones(shape, dtype) for name, dtype, shape in specs}
    for message in (codec.encode_message(tensors, header), *codec.encode_wire(tensors, header, 1 << 20)):
        base = np.frombuffer(message, np.uint8).ctypes.data
        asm = Assembler()
        asm.add_wire(message)
        for name, value in asm.finish().items():
            assert (value.ctypes.data - base) % codec.ALIGN == 0
            np.testing.assert_array_equal(value, tensors[name])
        assert ps_pb2.PushChunk.FromString(message).tensors[0].name == specs[0][0]  # protobuf reads the padding


def test_buffer_pool_hands_out_only_what_nobody_holds():
    pool = codec.BufferPool(max_bytes=8 << 20, min_bytes=1 << 20)
    a, b = pool.take(2 << 20), pool.take(2 << 20)
    assert a is not b
    a_id = id(a)
    view = a.view(np.float32)[:4]  # a view keeps its buffer busy
    del a
    c = pool.take(2 << 20)
    assert id(c) != a_id
    del view
    d = pool.take(2 << 20)  # nothing holds the first buffer any more: reused
    assert id(d) == a_id and pool.reused == 1
    del b, c, d
    big = pool.take(6 << 20)  # no room: idle buffers of another size are dropped
    assert big.nbytes == 6 << 20 and pool._bytes <= pool.max_bytes
    pool.forget(big)  # forgotten: never handed out again
    del big
    pool.take(6 << 20)
    assert pool.reused == 1
    assert pool.take(100).nbytes == 100  # below min_bytes: a plain allocation


def test_pooled_assembly_never_overwrites_a_tensor_the_caller_kept():
    pool = codec.BufferPool(min_bytes=1 << 10)
    first, second = np.arange(1 << 12, dtype=np.float32), -np.arange(1 << 12, dtype=np.float32)

    def decode(value):
        asm = Assembler(pool=pool)
        for message in codec.encode_wire({"w": value}, None, 4096):  # four pieces: reassembled
            asm.add_wire(message)
        return asm.finish()["w"]

    kept = decode(first)
    np.testing.assert_array_equal(decode(second), second)  # a buffer of its own: `kept` is held
    np.testing.assert_array_equal(kept, first)
    del kept
    np.testing.assert_array_equal(decode(second), second)
    assert pool.reused >= 1


def test_a_cleared_assembler_gives_its_pooled_buffers_back_to_the_system():
    pool = codec.BufferPool(min_bytes=1 << 10)
    asm = Assembler(pool=pool)
    asm.add_wire(next(iter(codec.encode_wire({"w": np.ones(1 << 12, np.float32)}, None, 4096))))
    assert pool._bytes == 1 << 14
    asm.clear()  # a failed stream: its memory is not kept for reuse
    assert pool._bytes == 0


def test_sparse_rows_where_dense_tensors_belong_are_refused():
    snap = codec.Snapshot(version=1, values={"w": SparseRows(np.array([0]), np.ones((1, 2), np.float32))}, slots={},
                          updates={}, last_seq={}, clocks={}, optimizer="sgd")
    with pytest.raises(CodecError, match="value 'w': sparse rows where a dense tensor belongs"):
        codec.decode_snapshot(codec.encode_snapshot(snap))
