"""A worker's gRPC session with a shard (common/ps_session.py, PushPullSession): the same
outcomes as PushPullOne, one stream held open per shard, and PushPullOne whenever a session
cannot answer. Real shard servers on 127.0.0.1, in this process."""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from asyncps import ps_session
from asyncps.config import Config
from asyncps.partition import place
from asyncps.protos.codec import SparseRows
from asyncps.protos.rpc import ps_stub
from asyncps.protos.serving import StreamLimits
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient

PARAMS = {"w": np.arange(4096, dtype=np.float32).reshape(512, 8), "b": np.zeros(5, np.float32),
          "emb": np.zeros((32, 4), np.float32)}


def _grads(i: int) -> dict:
    g = np.float32((i % 3 + 1) / 4)
    return {"w": np.full((512, 8), g, np.float32), "b": np.full(5, g, np.float32),
            "emb": SparseRows(np.array([1, 30, 1]), np.full((3, 4), g, np.float32))}


def _cfg(shards: int, **cluster) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = shards, 2, 10.0
    cfg.cluster.transport = "grpc"  # the gRPC path is what sessions are for
    cfg.optimizer.learning_rate = 1.0
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    return cfg


@contextlib.contextmanager
def _cluster(shards: int, sessions: bool = True, streams: StreamLimits | None = None, **cluster):
    cfg = _cfg(shards, **cluster)
    servers = [ShardServer(cfg, i, streams=streams) for i in range(shards)]
    addresses = [f"127.0.0.1:{s.start()}" for s in servers]
    placement = place({n: (a.shape, a.dtype) for n, a in PARAMS.items()}, shards, split_bytes=4096)
    client = PSClient(addresses, placement, cfg, sessions=sessions)
    try:
        client.init(PARAMS)
        yield client, servers
    finally:
        client.close()
        for s in servers:
            s.stop(0)


def _sequence(client: PSClient) -> tuple:
    """Push-pulls (one a retry: DUPLICATE) and a final pull; everything the client saw."""
    client.register(0)
    seen = []
    _, versions = client.pull(worker=0)
    for i in range(5):
        results, params, versions = client.push_pull(_grads(i), versions, 0, i)
        seen.append((results, versions, {n: v.copy() for n, v in params.items()}))
    seen.append(client.push_pull(_grads(4), versions, 0, 4)[0])  # a retry
    final, versions = client.pull(["b", "w", "emb"])
    return seen, final, versions


@pytest.mark.parametrize("shards", [1, 2])
def test_push_pulls_on_a_session_match_push_pull_one_bit_for_bit(shards):
    with _cluster(shards) as (client, servers):
        on = _sequence(client)
        sessions = client._sessions
        assert [s.opened for s in sessions] == [1] * shards  # one stream per shard, held for all six
        assert [s.fallbacks for s in sessions] == [0] * shards
        assert sum(s.servicer.grpc_pushes for s in servers) == 6 * shards
    with _cluster(shards, sessions=False) as (client, _):
        off = _sequence(client)
    (seen_on, final_on, versions_on), (seen_off, final_off, versions_off) = on, off
    assert versions_on == versions_off and repr(seen_on) == repr(seen_off)
    for name in final_on:
        np.testing.assert_array_equal(final_on[name], final_off[name])
    assert {r.result for r in seen_on[-1]} == {"DUPLICATE"}


def _refused(sessions: bool) -> tuple:
    with _cluster(1, sessions=sessions) as (client, servers):
        client.register(0)
        _, versions = client.pull(worker=0)
        bad = _grads(0)
        bad["b"] = np.array([0, np.nan, 0, 0, 0], np.float32)
        with pytest.raises(grpc.RpcError) as err:
            client.push_pull(bad, versions, 0, 0)
        results, _, _ = client.push_pull(_grads(1), versions, 0, 1)  # the next push is applied
        stats = servers[0].shard.stats()
        rejected = sum(w["rejected"] for w in stats["workers"])
        opened = client._sessions[0].opened if sessions else None
        return err.value.code(), err.value.details(), results[0].result, rejected, opened


def test_a_refused_push_on_a_session_raises_what_push_pull_one_raises_and_the_next_push_is_applied():
    code, details, result, rejected, opened = _refused(sessions=True)
    assert (code, details, result, rejected) == _refused(sessions=False)[:4]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in details
    assert result == "APPLIED" and rejected == 1  # counted once: a refusal is not sent again
    assert opened == 2  # the refusal ended the session; the next push opened another


def test_an_idle_session_is_reopened_before_the_shard_would_end_it():
    with _cluster(1) as (client, _):
        client.register(0)
        _, versions = client.pull(worker=0)
        _, _, versions = client.push_pull(_grads(0), versions, 0, 0)
        session = client._sessions[0]
        session._stream.used -= ps_session.IDLE_REOPEN_S + 1  # as if it had idled that long
        results, _, _ = client.push_pull(_grads(1), versions, 0, 1)
        assert results[0].result == "APPLIED" and session.opened == 2 and session.fallbacks == 0


def test_a_session_the_shard_cannot_admit_hands_each_request_to_push_pull_one(monkeypatch):
    """A shard whose stream limits are full refuses the session (RESOURCE_EXHAUSTED); every
    push-pull then goes as PushPullOne, with the outcome it would have had anyway, and no new
    session is tried for RETRY_AFTER_S (an over-subscribed shard pays no refused stream per call)."""
    monkeypatch.setattr(ps_session, "RETRY_AFTER_S", 3600.0)  # however slow the machine, one try
    full = StreamLimits(max_streams=0)
    with _cluster(1, streams=full) as (client, servers):
        seen, final, versions = _sequence(client)
        session = client._sessions[0]
        assert session.fallbacks == 6 and session.opened == 1
        # the channel's retry policy leaves the session out: one refused stream, not five
        # retried with backoff first (about 1.5 s of the step)
        assert servers[0].streams.counts["refused_total"] == 1
    with _cluster(1, sessions=False) as (client, _):
        assert repr(_sequence(client)[0]) == repr(seen)


def test_a_push_on_a_session_waits_on_the_shard_no_longer_than_its_wait_s():
    """ssp: a worker a clock ahead of the bound waits at its pull; on a session the wait ends at
    its header's wait_s (the client's rpc_timeout) with DEADLINE_EXCEEDED, as a unary call's
    deadline ends it, and the push it carried was applied."""
    for sessions in (True, False):
        with _cluster(1, sessions=sessions, mode="ssp", staleness_bound=0, rpc_timeout=0.5) as (client, servers):
            client.register(0)
            client.register(1)  # worker 1 never pushes: worker 0 may not run ahead of it
            _, versions = client.pull(worker=0)
            with pytest.raises(grpc.RpcError) as err:
                client.push_pull(_grads(0), versions, 0, 0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if sessions:  # the shard's own answer, naming what it waited for, came first
                assert "worker 0 pull (mode ssp)" in err.value.details()
            assert servers[0].shard.version == 1  # the push was applied before its pull waited


def test_closing_the_client_ends_a_push_left_waiting_on_a_session_at_once():
    """The chief pauses the shards before it stops them, so a worker's last push may be left
    waiting there; the worker closes its client to exit, and that call must end now (CANCELLED,
    as a unary call on a closed channel), not after its wait_s."""
    with _cluster(1) as (client, servers):
        client.register(0)
        _, versions = client.pull(worker=0)
        shard, waiting = servers[0].shard, threading.Event()
        wait = shard._wait

        def noted_wait(*args, **kwargs):
            waiting.set()
            return wait(*args, **kwargs)

        shard._wait = noted_wait
        shard.pause()
        ended: list = []

        def push():
            try:
                client.push_pull(_grads(0), versions, 0, 0)
            except grpc.RpcError as err:
                ended.append(err.code())

        caller = threading.Thread(target=push)
        caller.start()
        assert waiting.wait(30), "the push never reached the paused shard"
        client.close()
        caller.join(5)  # well under the push's wait_s (rpc_timeout 10 s)
        assert not caller.is_alive() and ended == [grpc.StatusCode.CANCELLED]


def test_a_session_the_shard_ended_for_idling_is_reopened_without_an_error():
    """The shard's stream guard ends an idle session cleanly; the next push-pull opens another."""
    with _cluster(1, streams=StreamLimits(idle_timeout=0.2)) as (client, servers):
        client.register(0)
        _, versions = client.pull(worker=0)
        _, _, versions = client.push_pull(_grads(0), versions, 0, 0)
        session = client._sessions[0]
        assert session._stream.ended.wait(30), "the shard never ended the idle session"
        assert servers[0].streams.counts["idle"] == 1
        results, _, _ = client.push_pull(_grads(1), versions, 0, 1)
        assert results[0].result == "APPLIED" and session.opened == 2 and session.fallbacks == 0


def test_stopping_a_shard_ends_its_idle_sessions_instead_of_waiting_out_the_grace():
    """An open session is a call in flight: the server's stop(grace) used to wait all of the grace
    for it (5 s at every shard's shutdown)."""
    with _cluster(1) as (client, servers):
        client.register(0)
        _, versions = client.pull(worker=0)
        client.push_pull(_grads(0), versions, 0, 0)  # the session stays open, idle
        assert servers[0].streams.open_streams == 1
        started = time.monotonic()
        servers[0].stop(120)
        assert time.monotonic() - started < 60  # not the grace
        assert servers[0].streams.open_streams == 0


def test_a_shard_without_sessions_gets_push_pull_one_from_then_on():
    """A shard from before sessions answers UNIMPLEMENTED: the request and every later one go as
    PushPullOne, and no session is tried again."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # serves no method at all
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            sent: list[bytes] = []
            session = ps_session.Session(ps_stub(channel).PushPullSession, lambda r: sent.append(r) or b"as unary", 5.0)
            assert [session.call(b"a"), session.call(b"b")] == [b"as unary", b"as unary"]
            assert sent == [b"a", b"b"] and session.opened == 1
            session.close()
    finally:
        server.stop(0)
