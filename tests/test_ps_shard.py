"""Parameter-server shards behind real gRPC servers on 127.0.0.1 (port 0), driven by PSClient.

No mocks: every test starts ShardServers in this process and talks to them over loopback.
"""
from __future__ import annotations

import re
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncps.config import Config
from asyncps.protos import ps_pb2, ps_pb2_grpc, tensor_pb2
from asyncps.protos.codec import SparseRows
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps.ps_client import PSClient, channel_options
from wire_oracle import decode_stream, encode_stream


def make_cfg(shards=2, workers=2, mode="async", **cluster):
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.mode = shards, workers, mode
    cfg.cluster.rpc_timeout = 10.0
    for key, value in cluster.items():
        setattr(cfg.cluster, key, value)
    cfg.optimizer.learning_rate = 1.0
    return cfg


class Cluster:
    """Shard servers plus a PSClient over a placement of `params`."""

    def __init__(self, cfg, params, split_bytes=1 << 20, register=True):
        self.cfg = cfg
        self.servers = [ShardServer(cfg, i) for i in range(cfg.cluster.ps)]
        self.addresses = [f"127.0.0.1:{s.start()}" for s in self.servers]
        self.placement = place({n: (a.shape, a.dtype) for n, a in params.items()}, cfg.cluster.ps, split_bytes)
        self.client = PSClient(self.addresses, self.placement, cfg)
        if params:
            self.client.init(params)
        if register:
            for w in range(cfg.cluster.workers):
                self.client.register(w)

    def stub(self, shard=0):
        channel = grpc.insecure_channel(self.addresses[shard], options=channel_options())
        self._channels = getattr(self, "_channels", []) + [channel]
        return ps_pb2_grpc.ParameterServerStub(channel)

    def close(self):
        self.client.close()
        for channel in getattr(self, "_channels", []):
            channel.close()
        for s in self.servers:
            s.stop(0)


@pytest.fixture
def cluster():
    made = []

    def make(cfg, params, **kw):
        made.append(Cluster(cfg, params, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


PARAMS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.zeros(4, np.float32),
    "emb": np.zeros((64, 8), np.float32),
    "frozen/table": np.ones((2, 2), np.float32),
}


def raw_push(stub, pieces, worker=0, seq=0, read_version=0, timeout=5.0):
    """A push of hand-made Tensor pieces, bypassing the client's checks."""
    msg = ps_pb2.PushChunk(header=ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version))
    msg.tensors.extend(pieces)
    return stub.Push(iter([msg]), timeout=timeout)


def piece(name, array, **overrides):
    """One whole-tensor piece for `array`, with fields overridden."""
    data = np.ascontiguousarray(array).tobytes()
    fields = dict(name=name, dtype=array.dtype.name, shape=array.shape, data=data, offset=0, total=len(data))
    fields.update(overrides)
    return tensor_pb2.Tensor(**fields)


# ----------------------------------------------------------------------------------------------
# Validation: every bad input is refused with a status naming the problem; state is unchanged.

W = np.ones((3, 4), np.float32)
BAD_PUSHES = {
    "unknown variable": ([piece("nope", W)], grpc.StatusCode.NOT_FOUND, "'nope' is not held"),
    "wrong shape": ([piece("w", np.ones((4, 3), np.float32))], grpc.StatusCode.INVALID_ARGUMENT, r"shape \(4, 3\), expected \(3, 4\)"),
    "wrong dtype": ([piece("w", W.astype(np.float64))], grpc.StatusCode.INVALID_ARGUMENT, "dtype float64, expected float32"),
    "NaN": ([piece("w", np.full((3, 4), np.nan, np.float32))], grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "Inf": ([piece("w", np.where(W > 0, np.inf, 0).astype(np.float32))], grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "unsupported dtype": ([piece("w", W, dtype="complex64")], grpc.StatusCode.INVALID_ARGUMENT, "unsupported dtype"),
    "bytes != shape": ([piece("w", W, shape=(3, 5))], grpc.StatusCode.INVALID_ARGUMENT, "needs 60"),
    "truncated chunk": ([piece("w", W, data=bytes(16), total=48)], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "oversized chunk": ([piece("w", W, data=bytes(16), total=48), piece("w", W, data=bytes(40), offset=16, total=48)],
                        grpc.StatusCode.INVALID_ARGUMENT, "past the declared total"),
    "out-of-order chunk": ([piece("w", W, data=bytes(16), total=48), piece("w", W, data=bytes(16), offset=32, total=48)],
                           grpc.StatusCode.INVALID_ARGUMENT, "out-of-order"),
    "frozen variable": ([piece("frozen/table", np.ones((2, 2), np.float32))], grpc.StatusCode.INVALID_ARGUMENT, "is frozen"),
    "sparse row out of range": ([piece("emb", np.ones((1, 8), np.float32), sparse=True, rows=np.array([64]).tobytes())],
                                grpc.StatusCode.INVALID_ARGUMENT, "row index out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_bad_push_is_rejected_and_state_unchanged(cluster, case):
    cfg = make_cfg(shards=1, workers=1)
    cfg.train.frozen = ["frozen/*"]
    c = cluster(cfg, PARAMS)
    before, versions = c.client.pull()
    pieces, code, message = BAD_PUSHES[case]
    with pytest.raises(grpc.RpcError) as err:
        raw_push(c.stub(), pieces)
    assert err.value.code() == code
    assert re.search(message, err.value.details()), err.value.details()
    after, versions_after = c.client.pull()
    assert versions_after == versions == [0]
    for name in PARAMS:
        np.testing.assert_array_equal(after[name], before[name])
    (stats,) = c.client.stats()
    assert stats.workers[0].rejected == 1 and stats.workers[0].applied == 0


def test_unregistered_worker_and_bad_versions_are_refused(cluster):
    c = cluster(make_cfg(shards=1, workers=2), PARAMS, register=False)
    c.client.register(0)
    stub = c.stub()
    with pytest.raises(grpc.RpcError) as err:
        raw_push(stub, [piece("w", W)], worker=1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "worker 1 is not registered" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        c.client.register(7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        raw_push(stub, [piece("w", W)], worker=0, read_version=5)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "read_version 5" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        c.client.pull(worker=1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    (stats,) = c.client.stats()
    assert stats.version == 0 and stats.rejected_unknown == 2


def test_pull_before_init_and_conflicting_init_fail_with_precondition(cluster):
    c = cluster(make_cfg(shards=1, workers=1), {}, register=False)
    stub = c.stub()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Pull(ps_pb2.PullRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Init first" in err.value.details()
    init = lambda values: stub.Init(encode_stream(values, ps_pb2.InitChunk), timeout=5)  # noqa: E731
    assert init({"w": W}).created
    assert not init({"w": W * 2}).created  # identical specs: no-op, first values win
    with pytest.raises(grpc.RpcError) as err:
        init({"w": np.ones(5, np.float32)})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    values = decode_stream(stub.Pull(ps_pb2.PullRequest(), timeout=5))
    np.testing.assert_array_equal(values["w"], W)


# ----------------------------------------------------------------------------------------------
# Pushes: idempotence, exact arithmetic under concurrency, sparse rows.


def test_retried_push_is_applied_once(cluster):
    c = cluster(make_cfg(), PARAMS)
    _, versions = c.client.pull(worker=0)
    grads = {"w": np.full((3, 4), 0.5, np.float32)}
    first = c.client.push(grads, versions, worker=0, seq=0)
    again = c.client.push(grads, versions, worker=0, seq=0)
    assert {r.result for r in first} == {"APPLIED"} and {r.result for r in again} == {"DUPLICATE"}
    params, versions = c.client.pull()
    np.testing.assert_array_equal(params["w"], PARAMS["w"] - 0.5)
    assert versions == [1, 1]
    assert sum(s.workers[0].duplicates for s in c.client.stats()) == 2


@pytest.mark.parametrize("pushes", [25, pytest.param(200, marks=pytest.mark.slow)])
def test_concurrent_pushers_give_exact_values_and_versions(cluster, pushes):
    """8 workers x `pushes` pushes of k/8 gradients, SGD lr 1: float32 arithmetic is exact."""
    workers = 8
    params = {"big": np.zeros((512, 4), np.float32), "b": np.zeros(3, np.float32), "emb": np.zeros((40, 2), np.float32)}
    c = cluster(make_cfg(shards=2, workers=workers), params, split_bytes=1024)  # "big" split by rows
    assert c.placement.variables["big"].split

    def grad(w, i):
        return np.float32(((w + i) % 4 + 1) / 8)

    def pusher(w):
        _, versions = c.client.pull(worker=w)
        for i in range(pushes):
            g = grad(w, i)
            grads = {"big": np.full((512, 4), g, np.float32), "b": np.full(3, g, np.float32),
                     "emb": SparseRows(np.array([w, w, 39]), np.full((3, 2), g, np.float32))}
            results, _, versions = c.client.push_pull(grads, versions, w, i)
            assert {r.result for r in results} == {"APPLIED"}

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(float(grad(w, i)) for w in range(workers) for i in range(pushes))
    final, versions = c.client.pull()
    assert versions == [workers * pushes] * 2
    np.testing.assert_array_equal(final["big"], np.full((512, 4), -total, np.float32))
    np.testing.assert_array_equal(final["b"], np.full(3, -total, np.float32))
    per_worker = [sum(float(grad(w, i)) for i in range(pushes)) for w in range(workers)]
    for w in range(workers):
        np.testing.assert_array_equal(final["emb"][w], np.full(2, -2 * per_worker[w], np.float32))
    np.testing.assert_array_equal(final["emb"][39], np.full(2, -total, np.float32))
    assert not final["emb"][8:39].any()  # rows never sent stay untouched
    for s in c.client.stats():
        assert [w.applied for w in s.workers] == [pushes] * workers
        assert sum(s.histogram) == workers * pushes
        assert sum(k * n for k, n in enumerate(s.histogram)) == sum(w.staleness_sum for w in s.workers)


# ----------------------------------------------------------------------------------------------
# Consistency modes.


def test_ssp_pull_waits_for_the_slowest_worker(cluster):
    c = cluster(make_cfg(shards=1, workers=2, mode="ssp", staleness_bound=1, rpc_timeout=0.5), PARAMS)
    _, v = c.client.pull(worker=0)
    g = {"b": np.ones(4, np.float32)}
    for seq in range(2):  # worker 0 finishes clocks 0 and 1; worker 1 still at 0
        c.client.push(g, v, 0, seq)
        if seq == 0:
            _, v = c.client.pull(worker=0)  # clock 1 <= 0 + 1: allowed
    with pytest.raises(grpc.RpcError) as err:
        c.client.pull(worker=0)  # clock 2 > 0 + 1: must wait for worker 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.client.push(g, [0], 1, 0)
    _, v = c.client.pull(worker=0)  # worker 1 finished clock 0: now allowed
    assert v == [3]


@pytest.mark.parametrize("bound", [0, 2])
def test_ssp_staleness_never_exceeds_the_bound(cluster, bound):
    """With M workers and bound s, a push is at most (M - 1)(2s + 1) shard versions stale."""
    workers, pushes = 3, 30
    c = cluster(make_cfg(shards=1, workers=workers, mode="ssp", staleness_bound=bound), PARAMS)
    rng = np.random.default_rng(bound)
    delays = rng.exponential(0.002, size=(workers, pushes)) * np.array([[1], [3], [10]])  # one straggler

    def run(w):
        _, v = c.client.pull(worker=w)
        for i in range(pushes):
            time.sleep(delays[w, i])
            _, _, v = c.client.push_pull({"b": np.ones(4, np.float32)}, v, w, i)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (s,) = c.client.stats()
    assert s.version == workers * pushes
    assert max(w.staleness_max for w in s.workers) <= (workers - 1) * (2 * bound + 1)


def test_sync_round_averages_with_zero_staleness(cluster):
    c = cluster(make_cfg(shards=1, workers=3, mode="sync"), PARAMS)
    results = {}

    def run(w):
        _, v = c.client.pull(worker=w)
        for i in range(5):
            r, _, v = c.client.push_pull({"b": np.full(4, w + 1, np.float32)}, v, w, i)
            results.setdefault(w, []).append(r[0].result)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    params, versions = c.client.pull()
    assert versions == [5]
    np.testing.assert_array_equal(params["b"], np.full(4, -5 * 2.0, np.float32))  # mean of 1, 2, 3
    (s,) = c.client.stats()
    assert s.rounds == 5 and s.histogram == [15] and all(w.staleness_max == 0 for w in s.workers)
    assert sorted(sum(results.values(), [])).count("APPLIED") == 5


def test_sync_backup_workers_late_gradients_are_dropped(cluster):
    c = cluster(make_cfg(shards=1, workers=3, mode="sync", backup_workers=1, rpc_timeout=0.5), PARAMS)
    _, v = c.client.pull()
    g = lambda x: {"b": np.full(4, x, np.float32)}  # noqa: E731
    assert c.client.push(g(1), v, 0, 0)[0].result == "ACCUMULATED"
    with pytest.raises(grpc.RpcError) as err:
        c.client.pull(worker=0)  # its round is not applied yet
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert c.client.push(g(3), v, 1, 0)[0].result == "APPLIED"  # 3 - 1 backup = 2 gradients
    assert c.client.push(g(100), v, 2, 0)[0].result == "DROPPED"  # late: read version 0
    params, versions = c.client.pull(worker=0)
    assert versions == [1]
    np.testing.assert_array_equal(params["b"], np.full(4, -2.0, np.float32))
    (s,) = c.client.stats()
    assert [w.dropped for w in s.workers] == [0, 0, 1] and s.rounds == 1 and s.histogram == [2]


# ----------------------------------------------------------------------------------------------
# Control: pause/resume, snapshot/restore, health, big tensors.


def test_push_waits_while_paused_and_snapshot_is_consistent(cluster):
    cfg = make_cfg(shards=2)
    cfg.optimizer.name = "momentum"
    c = cluster(cfg, PARAMS)
    _, v = c.client.pull(worker=0)
    c.client.push({"w": W}, v, 0, 0)
    assert c.client.pause() == [1, 1]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (c.client.push({"w": W}, [1, 1], 0, 1), done.set()))
    thread.start()
    assert not done.wait(0.3)  # held while paused
    snaps = c.client.snapshot()
    assert [s.version for s in snaps] == [1, 1]
    c.client.resume()
    assert done.wait(5)
    thread.join()
    assert c.client.pull()[1] == [2, 2]
    c.client.restore(snaps)  # back to version 1, momentum slots included
    params, versions = c.client.pull()
    assert versions == [1, 1]
    np.testing.assert_array_equal(params["w"], PARAMS["w"] - 1.0)
    after = c.client.snapshot()
    shard_w = c.placement.variables["w"].blocks[0].shard
    np.testing.assert_array_equal(after[shard_w].slots["w"]["momentum"], snaps[shard_w].slots["w"]["momentum"])


def test_health_service_reports_serving(cluster):
    c = cluster(make_cfg(shards=1, workers=1), PARAMS)
    with grpc.insecure_channel(c.addresses[0]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "asyncps.ParameterServer"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_64mib_tensor_round_trip_in_chunks(cluster):
    big = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MiB
    c = cluster(make_cfg(shards=1, workers=1), {"big": big})
    params, _ = c.client.pull(worker=0)
    np.testing.assert_array_equal(params["big"], big)
    c.client.push({"big": np.full_like(big, 0.5)}, [0], 0, 0)
    params, versions = c.client.pull()
    assert versions == [1]
    np.testing.assert_array_equal(params["big"], big - np.float32(0.5))
