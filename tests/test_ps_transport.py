"""The client's transport choices give identical results: unary ...One methods and streams."""
from __future__ import annotations

import numpy as np
import pytest

from asyncps.config import Config
from asyncps.protos import codec, ps_pb2
from asyncps.protos.codec import SparseRows
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient


def _cfg(shards: int) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = shards, 2, 10.0
    cfg.optimizer.learning_rate = 1.0
    return cfg


PARAMS = {
    "w": np.arange(4096, dtype=np.float32).reshape(512, 8),
    "b": np.zeros(5, np.float32),
    "emb": np.zeros((32, 4), np.float32),
}


def _grads(i: int) -> dict:
    g = np.float32((i % 3 + 1) / 4)
    return {"w": np.full((512, 8), g, np.float32), "b": np.full(5, g, np.float32),
            "emb": SparseRows(np.array([1, 30, 1]), np.full((3, 4), g, np.float32))}


def _run(shards: int, **client_kw):
    """Pushes, push-pulls and pulls through one client; everything it saw, and the final state."""
    cfg = _cfg(shards)
    servers = [ShardServer(cfg, i) for i in range(shards)]
    addresses = [f"127.0.0.1:{s.start()}" for s in servers]
    placement = place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, shards, split_bytes=4096)
    client = PSClient(addresses, placement, cfg, **{"transport": "grpc", **client_kw})  # the gRPC methods under test
    try:
        client.init(PARAMS)
        client.register(0)
        seen = []
        params, versions = client.pull(worker=0)
        seen.append(client.push(_grads(0), versions, 0, 0))
        for i in range(1, 4):
            results, params, versions = client.push_pull(_grads(i), versions, 0, i)
            seen.append((results, versions, {n: v.copy() for n, v in params.items()}))
        seen.append(client.push_pull(_grads(3), versions, 0, 3)[0])  # a retry: DUPLICATE
        final, versions = client.pull(["b", "w"])
        return seen, final, versions
    finally:
        client.close()
        for s in servers:
            s.stop(0)


@pytest.mark.parametrize("shards", [1, 2])
def test_unary_and_stream_transports_agree(shards):
    unary = _run(shards)  # everything fits UNARY_BYTES: the ...One methods
    streams = _run(shards, unary_bytes=0, chunk_bytes=1000)  # streams, tensors cut in pieces
    (seen_u, final_u, versions_u), (seen_s, final_s, versions_s) = unary, streams
    assert versions_u == versions_s
    for name in final_u:
        np.testing.assert_array_equal(final_u[name], final_s[name])
    assert repr(seen_u) == repr(seen_s)
    assert {r.result for r in seen_u[-1]} == {"DUPLICATE"}
    np.testing.assert_array_equal(final_u["b"], np.full(5, -(0.25 + 0.5 + 0.75 + 0.25), np.float32))


def test_encode_message_is_one_stream_message():
    header = ps_pb2.PushHeader(worker=1, seq=2, read_version=3).SerializeToString()
    tensors = {"big": np.ones(3 << 20, np.float32), "rows": SparseRows(np.array([0, 2]), np.ones((2, 3), np.float32))}
    message = codec.encode_message(tensors, header)
    chunk = ps_pb2.PushChunk.FromString(message)  # standard protobuf
    assert chunk.header.seq == 2 and [t.name for t in chunk.tensors] == ["big", "rows"]
    asm = codec.Assembler()
    assert asm.add_wire(message) == header
    out = asm.finish()
    np.testing.assert_array_equal(out["big"], tensors["big"])
    np.testing.assert_array_equal(out["rows"].rows, [0, 2])


def test_push_pull_async_matches_push_pull_and_owns_its_gradients():
    cfg = _cfg(2)
    servers = [ShardServer(cfg, i) for i in range(2)]
    addresses = [f"127.0.0.1:{s.start()}" for s in servers]
    placement = place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, 2, split_bytes=4096)
    client = PSClient(addresses, placement, cfg, unary_bytes=8192)  # "w" (16 KiB) streams, the rest unary
    try:
        client.init(PARAMS)
        client.register(0)
        _, versions = client.pull(worker=0)
        grads = _grads(0)
        future = client.push_pull_async(grads, versions, 0, 0)
        grads["w"][...] = 1e6  # encoded already: the push in flight is not affected
        results, params, versions = future.result(timeout=10)
        assert {r.result for r in results} == {"APPLIED"}
        np.testing.assert_array_equal(params["w"], PARAMS["w"] - 0.25)
        results, params, _ = client.push_pull_async(_grads(1), versions, 0, 1).result(timeout=10)
        np.testing.assert_array_equal(params["b"], np.full(5, -0.75, np.float32))
    finally:
        client.close()
        for s in servers:
            s.stop(0)


@pytest.mark.slow
def test_prefetching_worker_converges_with_one_version_of_staleness(tmp_path):
    """cluster.prefetch: one worker computes step t+1 while step t travels, so every push but the
    first is exactly one version stale, and the shards say so."""
    from cli_runner import CONFIGS, report, run_ok

    run_ok("launch", str(CONFIGS / "linear_regression.yaml"), f"run_dir={tmp_path}", "cluster.workers=1", "cluster.prefetch=true",
           timeout=120)
    r = report(tmp_path)
    assert abs(r["variables"]["linear.w"][0] - 2) < 0.02 and abs(r["variables"]["linear.b"][0]) < 0.05
    assert r["staleness"]["max"] == 1 and r["staleness"]["p50"] == 1


def test_a_streamed_pull_is_one_version_and_does_not_hold_the_shard():
    """The shard copies a pull's values under its lock and encodes them after: a push applied
    while the pull's stream is still being read neither waits for it nor shows up in it; and a
    pulled array the caller keeps is never overwritten by a later pull (reused receive buffers)."""
    cfg = _cfg(1)
    server = ShardServer(cfg, 0)
    big = {"w": np.zeros(8 << 20, np.float32)}  # 32 MiB: 32 messages, more than gRPC buffers ahead
    placement = place({n: (a.shape, a.dtype) for n, a in big.items()}, 1)
    client = PSClient([f"127.0.0.1:{server.start()}"], placement, cfg, transport="grpc")
    try:
        client.init(big)
        client.register(0)
        stream = client._stubs[0].Pull(ps_pb2.PullRequest(worker=0), timeout=30)
        asm = codec.Assembler()
        header = ps_pb2.PullHeader.FromString(asm.add_wire(next(stream)))  # served: its snapshot is taken
        result = client.push({"w": np.ones(8 << 20, np.float32)}, [0], 0, 0)[0]  # while the stream is open
        assert (result.result, result.version) == ("APPLIED", 1)
        for message in stream:
            asm.add_wire(message)
        assert header.version == 0 and not np.any(asm.finish()["w"])  # every byte from version 0
        kept, versions = client.pull(worker=0)
        assert versions == [1] and np.all(kept["w"] == -1.0)
        client.push({"w": np.ones(8 << 20, np.float32)}, [1], 0, 1)
        later, _ = client.pull(worker=0)
        assert np.all(later["w"] == -2.0) and np.all(kept["w"] == -1.0)
        del later
        client.pull(worker=0)
        assert client._receive_buffers.reused >= 1
    finally:
        client.close()
        server.stop(0)
