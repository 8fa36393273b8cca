"""The shared-memory data plane's control socket (common/shm_control.py, ps/shm_transport.py).

In-process shards on threads, real clients: control messages travel on the socket the shard
offers; a connection without the handshake's proof is refused and the worker's own still gets
in; a client that cannot connect keeps the segment and sends its control messages over gRPC
(said once); a deadline, a stopped shard and a closing client end a call as over gRPC.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading

import grpc
import numpy as np
import pytest

from asyncps import shm, shm_control
from asyncps.protos import ps_pb2
from asyncps.ps_client import RETRIED_CODES
from test_shm_transport import PARAMS, Cluster, _cfg, _grads

pytestmark = pytest.mark.skipif(not (shm.available() and shm_control.available()),
                                reason="no /dev/shm or Unix sockets on this host")


@contextlib.contextmanager
def _joined(shards: int = 1, cfg=None):
    """Shards over shared memory whose client registered worker 0 and pulled once: (cluster, versions)."""
    c = Cluster(shards, "shm", cfg=cfg)
    try:
        c.client.register(0)
        _, versions = c.client.pull(worker=0)
        yield c, versions
    finally:
        c.close()


def _control_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "shm-control" in t.name]


def test_control_messages_travel_on_the_socket():
    with _joined() as (c, versions):
        peer = c.client._shm.peers[0]
        assert peer.control is not None and "ps0-shm-control-w0" in _control_threads()
        for seq in range(3):
            results, params, versions = c.client.push_pull(_grads(seq, sparse=False), versions, 0, seq)
            assert results[0].result == "APPLIED"
        assert versions == [3] and c.servers[0].shard.version == 3
        np.testing.assert_allclose(params["b"], -0.5 * (0.25 + 0.5 + 0.75) * np.ones(5, np.float32))
    assert _wait_gone("ps0-shm-control-w0")  # the shard's stop ended the socket's thread


def _wait_gone(name: str) -> bool:
    for t in threading.enumerate():
        if t.name == name:
            t.join(10)
    return name not in _control_threads()


def test_a_connection_without_the_proof_is_refused_and_the_workers_gets_in():
    c = Cluster(1, "shm")
    try:
        stub = c.client._stubs[0]
        c.client.register(0)
        offer = stub.ShmOpen(ps_pb2.ShmOpenRequest(worker=0), timeout=10)
        segment = shm.Segment.attach(offer.name, offer.size)
        try:
            proof = shm.proof(segment.nonce(), None)
            confirmed = stub.ShmOpen(ps_pb2.ShmOpenRequest(worker=0, proof=proof, generation=offer.generation),
                                     timeout=10)
            assert confirmed.control
            stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stranger.settimeout(10)
            stranger.connect(shm_control.address(confirmed.control))
            shm_control.send_frame(stranger, shm_control.HELLO, b"\0" * len(proof))
            with pytest.raises(shm_control.FrameError):  # closed without an answer
                shm_control.recv_frame(stranger)
            stranger.close()
            worker = shm_control.ControlClient(confirmed.control, proof, 10)
            try:
                request = ps_pb2.ShmRequest(generation=offer.generation, pull=True, worker=0)
                reply = ps_pb2.ShmReply.FromString(worker.call(request.SerializeToString(), 10))
                assert reply.header.version == 0 and {t.name for t in reply.tensors} == set(PARAMS)
                stale = ps_pb2.ShmRequest(generation=offer.generation + 1, pull=True, worker=0)
                with pytest.raises(grpc.RpcError) as err:  # the servicer's code, on the socket
                    worker.call(stale.SerializeToString(), 10)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            finally:
                worker.close()
        finally:
            segment.close()
    finally:
        c.close()


def test_a_client_that_cannot_connect_uses_grpc_for_control(monkeypatch, caplog):
    def refused(name, proof, timeout):
        raise ConnectionRefusedError("connection refused (another network namespace)")

    monkeypatch.setattr("asyncps.shm_peer.ControlClient", refused)
    c = Cluster(2, "auto")
    try:
        with caplog.at_level(logging.WARNING, logger="asyncps.shm_peer"):
            c.client.register(0)
            params, versions = c.client.pull(worker=0)
            results, params, versions = c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert c.client.shm_shards() == [True, True]
        assert all(p.control is None for p in c.client._shm.peers)
        assert [r.result for r in results] == ["APPLIED", "APPLIED"] and versions == [1, 1]
        said = [r.getMessage() for r in caplog.records if "control socket" in r.getMessage()]
        assert len(said) == 1 and "control messages go over gRPC" in said[0], said
    finally:
        c.close()


def test_a_deadline_on_the_socket_is_deadline_exceeded_and_the_segment_reopens():
    cfg = _cfg(1, "shm")
    cfg.cluster.rpc_timeout = 1.0
    with _joined(cfg=cfg) as (c, versions):
        first = c.client._shm.peers[0]
        c.servers[0].shard.pause()
        with pytest.raises(grpc.RpcError) as err:
            c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.code() in RETRIED_CODES
        c.servers[0].shard.resume()
        c.client.register(0)  # what a worker does after a retried code
        results, params, versions = c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert c.client._shm.peers[0] is not first and c.client._shm.peers[0].control is not None
        assert results[0].result in ("APPLIED", "DUPLICATE")


def test_a_stopped_shard_ends_the_call_with_a_retried_code():
    with _joined() as (c, versions):
        assert c.client._shm.peers[0].control is not None
        c.servers[0].stop(0)
        with pytest.raises(grpc.RpcError) as err:
            c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert err.value.code() in RETRIED_CODES


def test_two_shards_over_sockets_one_stopped_releases_every_segment():
    """A push-pull to two shards sends both control messages before reading either answer
    (ShmLinks.scatter_gather); one shard stopping fails the call with a retried code, drops only
    that shard's segment and leaves the other's lock free for the next call."""
    with _joined(shards=2) as (c, versions):
        results, params, versions = c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert [r.result for r in results] == ["APPLIED", "APPLIED"] and versions == [1, 1]
        kept = c.client._shm.peers[0]
        assert all(p.control is not None for p in c.client._shm.peers)
        c.servers[1].stop(0)
        with pytest.raises(grpc.RpcError) as err:
            c.client.push_pull(_grads(1, sparse=False), versions, 0, 1)
        assert err.value.code() in RETRIED_CODES
        assert c.client._shm.peers[0] is kept and c.client._shm.peers[1] is None  # only shard 1's segment dropped
        assert kept.lock.acquire(blocking=False)  # released after the failed call
        kept.lock.release()
        assert c.servers[0].shard.version == 2  # shard 0 applied the push of seq 1


def test_an_oversized_frame_closes_the_socket_without_allocating_it():
    with _joined() as (c, versions):
        peer = c.client._shm.peers[0]
        # a frame header announcing 1 GiB, from the worker's own (authenticated) connection
        peer.control._sock.sendall(shm_control.HEADER.pack(1 << 30, shm_control.CALL))
        with pytest.raises(grpc.RpcError) as err:
            peer.control.receive(10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the shard closed it
        c.client.register(0)  # the worker's recovery: a fresh segment and socket
        results, params, versions = c.client.push_pull(_grads(0, sparse=False), versions, 0, 0)
        assert results[0].result == "APPLIED" and c.client._shm.peers[0].control is not None
