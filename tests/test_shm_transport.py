"""The same-host shared-memory data plane (common/shm.py, ps/shm_transport.py; cluster.transport).

In-process shards on threads and real clients over 127.0.0.1: the same sequence of calls gives
the same versions and values over shm as over gRPC; the handshake falls back (auto) or fails
(shm) with one line; garbage in a segment is refused and changes nothing; nothing stays in
/dev/shm. The launch tests (replay bit for bit, no leak after SIGKILLs) are marked slow.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from asyncps import shm
from asyncps.config import Config
from asyncps.partition import place
from asyncps.protos import codec, ps_pb2
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient, ShmUnavailable
from asyncps.sparse import SparseRows

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm on this host")

PARAMS = {
    "w": np.arange(4096, dtype=np.float32).reshape(512, 8) / 4096,
    "b": np.zeros(5, np.float32),
    "emb": np.zeros((32, 4), np.float32),
    "frozen_k": np.ones(3, np.float32),
}


def _cfg(shards: int, transport: str, **cluster) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = shards, 2, 20.0
    cfg.cluster.transport = transport
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    cfg.optimizer.learning_rate = 0.5
    cfg.train.frozen = ["frozen_*"]
    return cfg


def _grads(i: int, sparse: bool = True) -> dict:
    g = np.float32((i % 3 + 1) / 4)
    grads = {"w": np.full((512, 8), g, np.float32), "b": np.full(5, g, np.float32)}
    grads["emb"] = (SparseRows(np.array([1, 30, 1]), np.full((3, 4), g, np.float32)) if sparse
                    else np.full((32, 4), g, np.float32))
    return grads


class Cluster:
    """`shards` in-process shard servers and one client."""

    def __init__(self, shards: int, transport: str, cfg: Config | None = None, split_bytes: int = 4096, **cluster):
        self.cfg = cfg or _cfg(shards, transport, **cluster)
        self.servers = [ShardServer(self.cfg, i) for i in range(shards)]
        self.addresses = [f"127.0.0.1:{s.start()}" for s in self.servers]
        self.placement = place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, shards, split_bytes=split_bytes)
        self.client = self.new_client()
        self.client.init(PARAMS)

    def new_client(self, cfg: Config | None = None) -> PSClient:
        return PSClient(self.addresses, self.placement, cfg or self.cfg)

    def close(self):
        self.client.close()
        for s in self.servers:
            s.stop(0)


@pytest.fixture
def prefix_clean():
    before = shm.count_segments(shm.prefix_for(None))
    yield
    assert shm.count_segments(shm.prefix_for(None)) == before  # nothing left in /dev/shm


def _sequence(transport: str, shards: int, sparse: bool, split_bytes: int = 4096, **cluster):
    c = Cluster(shards, transport, split_bytes=split_bytes, **cluster)
    try:
        c.client.register(0)
        seen = []
        params, versions = c.client.pull(worker=0)
        seen.append((versions, {n: v.copy() for n, v in params.items()}))
        seen.append(c.client.push(_grads(0, sparse), versions, 0, 0))
        for i in range(1, 5):
            results, params, versions = c.client.push_pull(_grads(i, sparse), versions, 0, i, pull_age=0)
            seen.append((results, versions, {n: v.copy() for n, v in params.items()}))
        seen.append(c.client.push_pull(_grads(4, sparse), versions, 0, 4)[0])  # a retry: DUPLICATE
        fut = c.client.push_pull_async(_grads(5, sparse), versions, 0, 5)
        results, params, versions = fut.result()
        seen.append((results, versions, {n: v.copy() for n, v in params.items()}))
        used = c.client.shm_shards()
        final, fversions = c.client.pull(["b", "w"])  # the chief's kind of pull: gRPC
        stats = [s.shard.stats() for s in c.servers]
        counts = [(w["applied"], w["duplicates"], w["staleness_sum"]) for st in stats for w in st["workers"]]
        paths = [(r.shm_pushes, r.grpc_pushes) for r in c.client.stats()]  # StatsReply: pushes by path
        return seen, final, fversions, counts, used, paths
    finally:
        c.close()


@pytest.mark.parametrize("shards,sparse,split_bytes", [(1, False, 4096), (2, False, 4096), (2, True, 4096),
                                                      (2, True, 256)])  # 256: emb's rows split over both shards
def test_shm_and_grpc_give_the_same_results(shards, sparse, split_bytes, prefix_clean, monkeypatch):
    sparse_reads = []  # sparse tensors the shards read from a segment (not from the wire)
    real = codec.row_indices  # the shard's reads of sparse rows from a segment (ShmTensor), not the wire's
    monkeypatch.setattr(codec, "row_indices", lambda t, shape: (
        sparse_reads.append(t.name) if isinstance(t, ps_pb2.ShmTensor) and t.sparse else None) or real(t, shape))
    seen_g, final_g, v_g, counts_g, used_g, paths_g = _sequence("grpc", shards, sparse, split_bytes)
    assert sparse_reads == []
    seen_s, final_s, v_s, counts_s, used_s, paths_s = _sequence("shm", shards, sparse, split_bytes)
    # each of the 7 pushes reached every shard, by one path only (the shards count them)
    assert paths_g == [(0, 7)] * shards and paths_s == [(7, 0)] * shards
    # every push of the sequence (7: a push, 4 push-pulls, the retry, an async one) carried
    # `emb`'s rows in the segment: to its shard, or, split, to each shard holding some of them
    holders = {b.shard for b in place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, shards,
                                      split_bytes=split_bytes).variables["emb"].blocks}
    assert len(holders) == (2 if split_bytes == 256 else 1)
    assert sparse_reads == (["emb"] * 7 * len(holders) if sparse else [])
    assert used_g == [False] * shards and used_s == [True] * shards
    assert v_g == v_s and counts_g == counts_s
    assert repr(seen_g) == repr(seen_s)  # versions, results, every pulled value, bit for bit
    for name in final_g:
        np.testing.assert_array_equal(final_g[name], final_s[name])
    assert {r.result for r in seen_s[-2]} == {"DUPLICATE"}


def test_pulled_views_hold_the_pull_until_the_next_call(prefix_clean):
    """PSClient.pulled_views (the worker's loop): read-only views of the segment, equal to the
    copies gRPC gives, holding their values until the next call writes the segment again."""
    grpc_run, shm_run = Cluster(1, "grpc"), Cluster(1, "shm")
    try:
        shm_run.client.pulled_views = True
        got = {}
        for name, c in (("grpc", grpc_run), ("shm", shm_run)):
            c.client.register(0)
            _, versions = c.client.pull(worker=0)
            _, first, versions = c.client.push_pull(_grads(1, False), versions, 0, 0)
            kept = {n: v.copy() for n, v in first.items()}
            _, second, _ = c.client.push_pull(_grads(2, False), versions, 0, 1)
            got[name] = first, kept, second
        g_first, _, g_second = got["grpc"]
        s_first, s_kept, s_second = got["shm"]
        for n in g_second:
            np.testing.assert_array_equal(s_kept[n], g_first[n])  # what was pulled, bit for bit
            np.testing.assert_array_equal(s_second[n], g_second[n])
            assert not s_second[n].flags.writeable and not s_second[n].flags.owndata
        assert all(s_second[n] is shm_run.client._shm.peers[0].pull_at[n] for n in s_second)  # at the layout
        # the second call rewrote the region the first pull's views show; gRPC's copies stay
        assert not np.array_equal(s_first["w"], s_kept["w"])
        np.testing.assert_array_equal(s_first["w"], s_second["w"])
        with pytest.raises(ValueError):
            s_second["w"][0, 0] = 1.0  # a caller cannot write into the segment by mistake
    finally:
        grpc_run.close()
        shm_run.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_gradients_computed_in_the_push_region_push_the_same(shards, prefix_clean):
    """PSClient.push_buffers (the worker's loop computes its gradients there): the pushes give
    what copied gradients give, bit for bit; a variable split across shards gets no buffer."""
    runs = {}
    for name, transport in (("grpc", "grpc"), ("shm", "shm")):
        c = Cluster(shards, transport)
        try:
            c.client.register(0)
            _, versions = c.client.pull(worker=0)
            names = ["w", "b", "emb"]
            got = []
            for i in range(4):
                grads = _grads(i, sparse=False)
                bufs = c.client.push_buffers(0, names)
                if transport == "shm":
                    split = {n for n in names if c.placement.variables[n].split}
                    assert set(bufs) == set(names) - split and (shards == 1 or "w" in split)
                for n, buf in bufs.items():
                    buf[...] = grads[n]
                    grads[n] = buf
                results, params, versions = c.client.push_pull(grads, versions, 0, i)
                got.append((results, versions, {n: v.copy() for n, v in params.items()}))
            runs[name] = repr(got)
        finally:
            c.close()
    assert runs["grpc"] == runs["shm"]


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
@pytest.mark.parametrize("sparse", [False, True])
def test_compressed_pushes_over_shm(compression, sparse, prefix_clean):
    a = _sequence("grpc", 2, sparse, compression=compression)
    b = _sequence("shm", 2, sparse, compression=compression)
    assert repr(a[0]) == repr(b[0]) and b[4] == [True, True]


def test_controlled_staleness_age_over_shm(prefix_clean):
    out = {}
    for transport in ("grpc", "shm"):
        cfg = _cfg(1, transport)
        cfg.staleness.controlled, cfg.staleness.s = True, 3  # the shards keep 3 past versions
        c = Cluster(1, transport, cfg)
        try:
            c.client.register(0)
            params, versions = c.client.pull(worker=0)
            got = []
            for i in range(5):
                results, params, versions = c.client.push_pull(_grads(i, False), versions, 0, i, pull_age=2)
                got.append((results, versions, params["b"].copy()))
            got.append(c.client.pull(worker=0, age=1))
            got.append(c.servers[0].shard.stats()["workers"])
            out[transport] = repr(got)
            assert c.client.shm_shards() == [transport == "shm"]
        finally:
            c.close()
    assert out["grpc"] == out["shm"]


def test_segment_is_private_and_unlinked_after_the_handshake(prefix_clean, monkeypatch):
    created = []
    real_create = shm.Segment.create.__func__

    def spy(cls, prefix, size):
        seg, nonce = real_create(cls, prefix, size)
        created.append((seg.path, os.stat(seg.path).st_mode & 0o777, size))
        return seg, nonce

    monkeypatch.setattr(shm.Segment, "create", classmethod(spy))
    c = Cluster(1, "shm")
    try:
        c.client.register(0)
        c.client.pull(worker=0)
        (path, mode, size), = created
        assert mode == 0o600 and not os.path.exists(path)  # unlinked once confirmed
        assert len(Path(path).name) >= len(shm.prefix_for(None)) + 32
        stats = c.client.stats()[0]
        variables = sum(a.nbytes for a in PARAMS.values())
        assert stats.shm_segments == 1 and stats.shm_bytes == size
        assert size <= shm.HEADER_BYTES + 2 * variables + 64 * 2 * len(PARAMS)  # bounded by the variables
    finally:
        c.close()


def test_wrong_nonce_falls_back_with_auto_and_fails_with_shm(monkeypatch, caplog, prefix_clean):
    monkeypatch.setattr(shm.Segment, "nonce", lambda self: b"\0" * shm.NONCE_BYTES)
    c = Cluster(2, "auto")
    try:
        with caplog.at_level(logging.WARNING, logger="asyncps.shm_peer"):
            c.client.register(0)
            params, versions = c.client.pull(worker=0)
            c.client.push_pull(_grads(0, False), versions, 0, 0)
        assert c.client.shm_shards() == [False, False]
        lines = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
        assert len(lines) == 1 and "PERMISSION_DENIED" in lines[0] and "using gRPC" in lines[0]
        strict = c.new_client(_cfg(2, "shm"))
        try:
            strict.register(1)
            with pytest.raises(ShmUnavailable) as err:
                strict.pull(worker=1)
            assert "\n" not in str(err.value) and "cluster.transport shm" in str(err.value)
        finally:
            strict.close()
        assert [s.shm.stats()["shm_segments"] for s in c.servers] == [0, 0]  # refused segments dropped
    finally:
        c.close()


def test_proof_is_tied_to_the_job_token(monkeypatch, prefix_clean):
    """With cluster.security's token, the proof is HMAC(token, nonce): the bare nonce (what a
    process of the same user without the token could read) is refused."""
    monkeypatch.setenv("ASYNCPS_SHM_TEST_TOKEN", "s3cret-token")
    cfg = _cfg(1, "shm")
    cfg.cluster.security.token_env = "ASYNCPS_SHM_TEST_TOKEN"
    c = Cluster(1, "shm", cfg)
    try:
        c.client.register(0)
        c.client.pull(worker=0)
        assert c.client.shm_shards() == [True]
        c.client._shm._token = None  # a client that knows the nonce but not the token
        c.client.register(0)
        with pytest.raises(ShmUnavailable, match="PERMISSION_DENIED"):
            c.client.pull(worker=0)
    finally:
        c.close()


def test_shard_with_transport_grpc_means_grpc(prefix_clean):
    c = Cluster(1, "grpc")
    try:
        auto = c.new_client(_cfg(1, "auto"))
        try:
            auto.register(0)
            auto.pull(worker=0)
            assert auto.shm_shards() == [False]
        finally:
            auto.close()
    finally:
        c.close()


def _rows(*indices: int) -> bytes:
    return np.array(indices, "<i8").tobytes()


def _raw_push(c: Cluster, tensors, seq=0, version=0, via="grpc"):
    """A ShmPushPull written by hand: `tensors` (name -> (array, offset or None[, sparse rows'
    index bytes])) into the segment; `via` "grpc" (the method) or "socket" (the control socket,
    common/shm_control.py)."""
    client = c.client
    stub = client._stubs[0]
    peer = client._shm.peer(0, stub, 0)
    lo, hi = peer.push
    specs, at = [], lo
    for name, (array, offset, *rows) in tensors.items():
        offset = at if offset is None else offset
        if 0 <= offset and offset + array.nbytes <= peer.segment.size:
            peer.segment.mm[offset:offset + array.nbytes] = array.tobytes()
        specs.append(ps_pb2.ShmTensor(name=name, dtype=array.dtype.name, shape=array.shape, offset=offset,
                                      nbytes=array.nbytes, sparse=bool(rows), rows=rows[0] if rows else b""))
        at = shm.aligned(at + array.nbytes)
    header = ps_pb2.PushHeader(worker=0, seq=seq, read_version=version)
    request = ps_pb2.ShmRequest(generation=peer.generation, push=header, tensors=specs, pull=True)
    if via == "socket":
        assert peer.control is not None
        return ps_pb2.ShmReply.FromString(peer.control.call(request.SerializeToString(), 10))
    return stub.ShmPushPull(request, timeout=10)


@pytest.mark.parametrize("via", ["grpc", "socket"])
def test_garbage_in_the_segment_is_refused_and_changes_nothing(via, prefix_clean):
    c = Cluster(1, "shm")
    try:
        c.client.register(0)
        before, versions = c.client.pull(worker=0)
        shard = c.servers[0].shard
        nan_b = np.full(5, np.nan, np.float32)
        bad = [
            {"b": (nan_b, None)},  # NaN
            {"b": (np.full(6, 1, np.float32), None)},  # wrong shape
            {"b": (np.full(5, 1, np.float64), None)},  # wrong dtype
            {"b": (np.full(5, 1, np.float32), 0)},  # points at the header
            {"b": (np.full(5, 1, np.float32), 10 << 30)},  # outside the segment
            {"nope": (np.full(5, 1, np.float32), None)},  # unknown variable
            {"frozen_k": (np.ones(3, np.float32), None)},  # frozen
            {"w": (np.full((512, 8), np.inf, np.float32), None), "b": (np.ones(5, np.float32), None)},
            # sparse rows of `emb` (32 x 4): indices short, out of range, more rows than it has,
            # NaN values, the wrong row shape
            {"emb": (np.ones((2, 4), np.float32), None, _rows(1))},
            {"emb": (np.ones((2, 4), np.float32), None, _rows(1, 32))},
            {"emb": (np.ones((33, 4), np.float32), None, _rows(*range(33)))},
            {"emb": (np.full((2, 4), np.nan, np.float32), None, _rows(1, 2))},
            {"emb": (np.ones((2, 3), np.float32), None, _rows(1, 2))},
            {"b": (np.ones((), np.float32), None, b"")},  # sparse rows without a row count
        ]
        for tensors in bad:
            with pytest.raises(grpc.RpcError) as err:
                _raw_push(c, tensors, via=via)
            assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), tensors
        after, versions_after = c.client.pull(worker=0)
        assert versions_after == versions == [0] and shard.version == 0
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])
        assert shard.stats()["workers"][0]["rejected"] == len(bad)
        # the same segment still serves a good push, sparse rows included
        reply = _raw_push(c, {"b": (np.ones(5, np.float32), None),
                              "emb": (np.ones((2, 4), np.float32), None, _rows(3, 3))}, via=via)
        assert reply.header.push.result == ps_pb2.PushReply.APPLIED and reply.header.version == 1
        emb = shard.variables["emb"].value
        assert np.all(emb[3] == -1.0) and not np.any(np.delete(emb, 3, axis=0))  # lr 0.5 x (1 + 1): duplicates summed
    finally:
        c.close()


@pytest.mark.parametrize("via", ["grpc", "socket"])
def test_garbage_at_the_layout_is_refused_and_changes_nothing(via, prefix_clean, monkeypatch):
    """A push `at_layout` (the worker's steps) is checked like any other: NaN or Inf anywhere is
    INVALID_ARGUMENT and changes nothing; naming tensors as well is refused too. Its values are
    checked in one pass over the copied block; only when that fails (a bad value, or garbage in
    a gap between places) does the shard check tensor by tensor, to name the bad one or accept."""
    c = Cluster(1, "shm")
    try:
        c.client.register(0)
        before, versions = c.client.pull(worker=0)
        peer = c.client._shm.peer(0, c.client._stubs[0], 0)
        assert set(peer.push_at) == {"w", "b", "emb"} and set(peer.pull_at) == set(PARAMS)

        def push(fill, tensors=(), seq=0):
            for name, place in peer.push_at.items():
                place[...] = fill.get(name, 0.0)
            request = ps_pb2.ShmRequest(generation=peer.generation, push=ps_pb2.PushHeader(worker=0, seq=seq),
                                        pull=True, at_layout=True, tensors=tensors)
            if via == "socket":
                return ps_pb2.ShmReply.FromString(peer.control.call(request.SerializeToString(), 10))
            return c.client._stubs[0].ShmPushPull(request, timeout=10)

        for fill, tensors in (({"b": np.nan}, ()), ({"w": np.inf}, ()),
                              ({}, [ps_pb2.ShmTensor(name="b", dtype="float32", shape=[5], offset=peer.push[0],
                                                     nbytes=20)])):
            with pytest.raises(grpc.RpcError) as err:
                push(fill, tensors)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fill
            if fill:  # the one-pass check of the block failed; the per-tensor check names the variable
                assert f"variable {next(iter(fill))!r}" in err.value.details(), err.value.details()
        after, versions_after = c.client.pull(worker=0)
        assert versions_after == versions == [0] and c.servers[0].shard.version == 0
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])
        from asyncps.ps import validate

        per_tensor = []  # pushes the shard checked tensor by tensor
        check = validate.check_gradients
        monkeypatch.setattr(validate, "check_gradients", lambda *a: per_tensor.append(1) or check(*a))
        # NaN bytes in the gap after b's 20 bytes (places are 64-byte aligned; emb's comes next)
        # are no gradient: the block's one-pass check sees them, the per-tensor check accepts
        gap = peer.push_at["b"].ctypes.data - peer.segment._address() + 20
        peer.segment.mm[gap:gap + 44] = np.full(11, np.nan, np.float32).tobytes()
        for name, place in peer.push_at.items():
            place[...] = 1.0 if name == "b" else 0.0
        request = ps_pb2.ShmRequest(generation=peer.generation, push=ps_pb2.PushHeader(worker=0, seq=0),
                                    pull=True, at_layout=True)
        reply = (ps_pb2.ShmReply.FromString(peer.control.call(request.SerializeToString(), 10)) if via == "socket"
                 else c.client._stubs[0].ShmPushPull(request, timeout=10))
        assert reply.header.push.result == ps_pb2.PushReply.APPLIED and reply.at_layout and not reply.tensors
        np.testing.assert_array_equal(peer.pull_at["b"], before["b"] - 0.5)  # lr 0.5, gradient 1
        assert per_tensor == [1]
        peer.segment.mm[gap:gap + 44] = bytes(44)  # a clean gap: the one pass proves the push finite
        reply = push({"b": 1.0}, seq=1)
        assert reply.header.push.result == ps_pb2.PushReply.APPLIED and reply.header.version == 2
        np.testing.assert_array_equal(peer.pull_at["b"], before["b"] - 1.0)
        assert per_tensor == [1]  # (not checked again tensor by tensor)
    finally:
        c.close()


def test_a_stale_generation_is_refused(prefix_clean):
    c = Cluster(1, "shm")
    try:
        c.client.register(0)
        c.client.pull(worker=0)
        peer = c.client._shm.peers[0]
        request = ps_pb2.ShmRequest(generation=peer.generation + 1, pull=True, worker=0)
        with pytest.raises(grpc.RpcError) as err:
            c.client._stubs[0].ShmPushPull(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        c.client.register(0)  # a rejoin opens a new segment
        c.client.pull(worker=0)
        assert c.client._shm.peers[0].generation != peer.generation
        assert c.servers[0].shm.stats()["shm_segments"] == 1
    finally:
        c.close()


def test_segment_write_copies_aside_what_lies_in_the_segment():
    """Segment.write of arrays that lie in the segment itself, in an order that puts one over
    another's bytes: each is copied aside first, so no write overwrites an input before it
    was read."""
    seg, _ = shm.Segment.create(shm.prefix_for(None), shm.HEADER_BYTES + 8192)
    try:
        lo, hi = shm.HEADER_BYTES, seg.size
        a, b = seg.view(np.float32, (100,), lo), seg.view(np.float32, (300,), lo + 448)  # 400 bytes, 64-aligned
        a[:], b[:] = np.arange(100), -np.arange(300)
        assert seg.holds(a) and seg.holds(b) and not seg.holds(a.copy())
        placed = seg.write({"b": b, "a": a}, lo, hi)  # b goes first, over the bytes a holds
        offsets = {n: o for n, _, o in placed}
        assert offsets == {"b": lo, "a": lo + 1216}
        np.testing.assert_array_equal(seg.view(np.float32, (300,), offsets["b"]), -np.arange(300))
        np.testing.assert_array_equal(seg.view(np.float32, (100,), offsets["a"]), np.arange(100))
        assert seg.write({"b": b}, lo, lo + 600) is None  # does not fit
    finally:
        del a, b
        seg.close()


def test_remove_segments_by_prefix():
    prefix = shm.prefix_for(f"/tmp/asyncps-test-{os.getpid()}-{time.time()}")
    segs = [shm.Segment.create(prefix, 8192)[0] for _ in range(3)]
    assert shm.count_segments(prefix) == 3
    assert shm.remove_segments(prefix) == 3 and shm.count_segments(prefix) == 0
    for seg in segs:
        seg.close()
    with pytest.raises(ValueError):
        shm.remove_segments("")


# ------------------------------------------------------------------------------------------------
# Launches (slow): replay bit for bit over shm, no segment left after SIGKILLs


def _launch(tmp_path: Path, *overrides: str, timeout: float = 240):
    import subprocess

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "asyncps.cli", "launch", "configs/linear_regression.yaml", f"run_dir={run_dir}",
           "cluster.transport=shm", *overrides]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=timeout)
    return proc, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [(), ("cluster.prefetch=true",), ("cluster.mode=sync",),
                                       ("cluster.mode=ssp", "cluster.ps=2", "cluster.compression=bf16")])
def test_launch_over_shm_trains_and_replays_bit_for_bit(tmp_path, overrides):
    import subprocess

    proc, run_dir = _launch(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for log in run_dir.glob("ps*.log"):
        assert "on shared memory" in log.read_text(), log
    replay = subprocess.run([sys.executable, "-m", "asyncps.cli", "replay", str(run_dir)], capture_output=True,
                            text=True, timeout=240)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "bit-identical" in replay.stdout + replay.stderr
    assert shm.count_segments(shm.prefix_for(run_dir)) == 0


@pytest.mark.slow
def test_no_segment_left_after_sigkills(tmp_path):
    """A launch whose worker and shard are SIGKILLed mid-run (checkpoints and restarts on), plus a
    segment left mid-handshake: nothing with the run's prefix stays in /dev/shm once the launcher
    is stopped (Ctrl-C)."""
    import json
    import subprocess

    run_dir = tmp_path / "run"
    prefix = shm.prefix_for(run_dir)
    cmd = [sys.executable, "-m", "asyncps.cli", "launch", "configs/linear_regression.yaml", f"run_dir={run_dir}",
           "cluster.transport=shm", "train.max_steps=200000", "train.max_seconds=60", "checkpoint.every_steps=200"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: '"kind": "checkpoint"' in _text(run_dir / "metrics.jsonl"), 120, proc)
        pids = _wait_for(lambda: _on_shm(run_dir), 120, proc)
        os.kill(pids["worker0"]["pid"], signal.SIGKILL)
        os.kill(pids["ps0"]["pid"], signal.SIGKILL)
        # the restarted shard and worker handshake again (a fresh segment pair)
        _wait_for(lambda: "restart" in _text(run_dir / "ps0.log") and _text(run_dir / "ps0.log").count(
            "on shared memory") >= 2, 120, proc)
        # a segment mid-handshake when everything is killed: made by hand under the run's prefix
        orphan, _ = shm.Segment.create(prefix, 8192)
        assert shm.count_segments(prefix) >= 1
        os.kill(proc.pid, signal.SIGINT)  # the launcher stops its children, then cleans by prefix
        proc.communicate(timeout=120)
        orphan.mm.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert shm.count_segments(prefix) == 0
    json.loads((run_dir / "pids.json").read_text())


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _on_shm(run_dir: Path):
    """pids.json's pids once every shard log says a worker is on shared memory."""
    import json

    if "on shared memory" not in _text(run_dir / "ps0.log"):
        return None
    try:
        return json.loads((run_dir / "pids.json").read_text())
    except (OSError, ValueError):
        return None


def _wait_for(fn, seconds: float, proc=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, f"the launcher exited ({proc.returncode})"
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.mark.slow
def test_no_segment_left_when_the_launcher_is_sigkilled(tmp_path):
    """The launcher SIGKILLed: its children get SIGTERM (PDEATHSIG), the shards unlink what they
    hold; confirmed segments were unlinked at their handshake anyway."""
    import subprocess

    run_dir = tmp_path / "run"
    prefix = shm.prefix_for(run_dir)
    cmd = [sys.executable, "-m", "asyncps.cli", "launch", "configs/linear_regression.yaml", f"run_dir={run_dir}",
           "cluster.transport=shm", "train.max_steps=200000", "train.max_seconds=60"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        pids = _wait_for(lambda: _on_shm(run_dir), 120, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        _wait_for(lambda: not any(_alive(entry["pid"]) for entry in pids.values()), 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert shm.count_segments(prefix) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by nobody yet) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
    return True


def test_compose_shm_shares_one_tmpfs_between_shards_and_workers():
    from asyncps.cli.compose import render
    from asyncps.config import load_config

    cfg = load_config("configs/mnist_mlp.yaml", ["cluster.ps=2"])
    plain = render(cfg, "./configs/mnist_mlp.yaml")
    shared = render(cfg, "./configs/mnist_mlp.yaml", shm=True)
    assert "shm" not in plain["volumes"] and not any("/dev/shm" in str(s["volumes"]) for s in plain["services"].values())
    for name in ("ps0", "ps1", "worker"):
        assert "shm:/dev/shm:nocopy" in shared["services"][name]["volumes"]  # nocopy: cli/compose.py
    assert not any("/dev/shm" in v for v in shared["services"]["chief"]["volumes"])
    assert shared["volumes"]["shm"]["driver_opts"]["type"] == "tmpfs"
