"""The client of all parameter-server shards: split, send in parallel, join.

    client = PSClient(["127.0.0.1:50051", "127.0.0.1:50052"], placement, cfg)
    client.init(initial_params)              # full arrays by name; first initializer wins
    client.register(worker)                  # once, with the index the chief assigned
    params, versions = client.pull(worker=worker)
    params, versions = client.pull(worker=worker, age=r)  # controlled staleness: r versions ago
    results = client.push(grads, versions, worker, seq)   # seq = 0, 1, 2, ... per worker
    results, params, versions = client.push_pull(grads, versions, worker, seq, pull_age=r)
    future = client.push_pull_async(grads, versions, worker, seq)  # the same, in the background

`versions` is a list with one shard version per shard (see protos/ps.proto). Gradients are full
arrays or `SparseRows` with global row indices; the placement cuts them per shard and joins
pulled blocks back. Every shard gets every push, even an empty one, so that ssp clocks advance.

Transport: a call whose request and reply both fit in `unary_bytes` (UNARY_BYTES, 4 MiB) uses the
unary twin (PullOne, PushOne, PushPullOne: one message each way); larger ones stream 1 MiB
chunks. For MLP-sized pushes the unary path costs about half the client CPU of a stream (no
request-iterator thread, one send per direction; see docs/performance.md).

gRPC: channels are made in the constructor, so build the client inside the process that uses it
(never before a fork). Every call has a deadline (``cluster.rpc_timeout``) and waits for the
shard to become ready; the channel's service config retries UNAVAILABLE and RESOURCE_EXHAUSTED
(a shard's stream limits or byte budget; all shard calls are idempotent: pushes by (worker, seq),
Init by first-wins). Errors surface as grpc.RpcError with the shard's status code and message;
`RETRIED_CODES` are those a worker recovers from by rejoining.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

from asyncps.protos import codec, ps_pb2
from asyncps.protos.rpc import ps_stub
from asyncps.shard_types import PushResult, Snapshot
from asyncps.sparse import SparseRows

__all__ = ["PSClient", "PushResult", "SparseRows", "Snapshot", "channel_options"]

_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "asyncps.ParameterServer"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }]
})


# The status codes after which a worker drops its gradient, registers again, re-pulls and goes
# on (worker/main.py; docs/failures.md): a shard restarted (FAILED_PRECONDITION, UNAVAILABLE,
# CANCELLED by its shutdown), restored to an older version (OUT_OF_RANGE), too slow or frozen
# for the call's deadline, or a stream ended by the shard's idle timeout (DEADLINE_EXCEEDED),
# a shard with no room for the call now (RESOURCE_EXHAUSTED: its stream limits or byte
# budget). INVALID_ARGUMENT and NOT_FOUND (a bad gradient) are never retried.
RETRIED_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def channel_options() -> list[tuple[str, Any]]:
    """Options of every channel to a shard: no message limits, retries, keepalive."""
    return [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", 30_000),  # the server permits pings every 10 s
    ]


UNARY_BYTES = 4 << 20  # at most this many bytes each way: one unary message instead of a stream


def _nbytes(tensors: Mapping[str, Any]) -> int:
    return sum(v.values.nbytes + v.rows.nbytes if isinstance(v, SparseRows) else v.nbytes for v in tensors.values())


def _push_result(reply: ps_pb2.PushReply) -> PushResult:
    return PushResult(ps_pb2.PushReply.Result.Name(reply.result), reply.version, reply.staleness)


class PSClient:
    """Talks to every shard of a cluster; see the module docstring.

    `placement` is an ``asyncps.partition.Placement`` (anything with ``num_shards``,
    ``split(tensors)`` and ``join(pieces, names)``); `cfg` the run's Config.
    """

    def __init__(self, addresses: list[str], placement, cfg, chunk_bytes: int = codec.CHUNK_BYTES,
                 unary_bytes: int = UNARY_BYTES):
        if len(addresses) != placement.num_shards:
            raise ValueError(f"{len(addresses)} shard addresses for a placement of {placement.num_shards} shards")
        self.addresses = list(addresses)
        self.placement = placement
        self.timeout = cfg.cluster.rpc_timeout
        self._chunk = chunk_bytes
        # Transfers whose both directions fit in `unary_bytes` use the unary ...One methods.
        shard_bytes = getattr(placement, "shard_bytes", None)
        self._pull_bytes = shard_bytes() if shard_bytes is not None else [float("inf")] * placement.num_shards
        self._unary = unary_bytes
        from asyncps.protos.security import open_channel  # TLS/mTLS and the job token: cluster.security
        self._channels = [open_channel(a, cfg.cluster.security, channel_options()) for a in self.addresses]
        self._stubs = [ps_stub(c) for c in self._channels]  # tensor streams as codec wire bytes
        # One small pool per calling thread: a call that waits at a shard (ssp/sync pull) must
        # not hold a thread that another caller of this client needs (a shared pool deadlocks).
        self._local = threading.local()
        self._pools: list[ThreadPoolExecutor] = []
        self._pools_lock = threading.Lock()
        self._background: ThreadPoolExecutor | None = None  # push_pull_async
        from asyncps.compression import make_compressor  # cluster.compression: 16-bit pushes
        self._compress = make_compressor(getattr(cfg.cluster, "compression", "none"))

    # ------------------------------------------------------------------------------------------
    # Plumbing

    def _call(self, stub_method, request, **kw):
        """One call with this client's deadline and wait_for_ready."""
        return stub_method(request, timeout=self.timeout, wait_for_ready=True, **kw)

    def _each(self, fn, args_per_shard=None) -> list:
        """fn(shard_index, stub[, args]) on every shard in parallel; results by shard index.

        Shard 0 runs in the calling thread, the others in this thread's own pool.
        """
        args = args_per_shard or [()] * len(self._stubs)
        jobs = list(enumerate(zip(self._stubs, args)))
        futs = [self._my_pool().submit(fn, i, stub, *a) for i, (stub, a) in jobs[1:]]
        first = fn(0, jobs[0][1][0], *jobs[0][1][1])
        return [first] + [f.result() for f in futs]

    def _my_pool(self) -> ThreadPoolExecutor:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=max(1, len(self._stubs) - 1), thread_name_prefix="ps-client")
            self._local.pool = pool
            with self._pools_lock:
                self._pools.append(pool)
        return pool

    def _stream(self, tensors, header: bytes | None = None):
        return codec.encode_wire(tensors, header, self._chunk)

    @staticmethod
    def _read_pull(replies) -> tuple[ps_pb2.PullHeader, dict]:
        """(header, values) of a Pull/PushPull reply stream (wire bytes)."""
        asm, header = codec.Assembler(), None
        for message in replies:
            raw = asm.add_wire(message)
            if header is None and raw is not None:
                header = ps_pb2.PullHeader.FromString(raw)
        return header, asm.finish()

    # ------------------------------------------------------------------------------------------
    # The API

    def init(self, params: Mapping[str, Any]) -> list[bool]:
        """Sends initial values (full arrays) to the shards; per shard, True if it created them."""
        pieces = self.placement.split(params)

        def one(i, stub, values):
            return self._call(stub.Init, self._stream(values)).created

        return self._each(one, [(p,) for p in pieces])

    def register(self, worker: int, retire: bool = False) -> list[tuple[int, int]]:
        """Registers (or retires) `worker` with every shard; per shard (clock, last_seq)."""
        request = ps_pb2.RegisterWorkerRequest(worker=worker, retire=retire)

        def one(i, stub):
            reply = self._call(stub.RegisterWorker, request)
            return reply.clock, reply.last_seq

        return self._each(one)

    def pull(self, names: list[str] | None = None, worker: int | None = None, age: int = 0,
             at_version: int = 0) -> tuple[dict, list[int]]:
        """(full arrays by name, shard versions). A worker's pull may wait (ssp/sync).

        With `names`, only the shards holding them are asked; the others' versions are -1.
        With `age` (controlled staleness), every shard serves its values of `age` versions ago.
        With `at_version` (the chief's evaluations), every shard serves its values of exactly
        that version (NOT_FOUND where not kept).
        """
        wanted = list(self.placement.variables) if names is None else list(names)
        requests = [self._pull_request(i, names, worker, age, at_version) for i in range(len(self._stubs))]

        def one(i, stub, req):
            if req is None:
                return ps_pb2.PullHeader(version=-1), {}
            if self._pull_bytes[i] <= self._unary:
                return self._read_pull((self._call(stub.PullOne, req),))
            return self._read_pull(self._call(stub.Pull, req))

        results = self._each(one, [(r,) for r in requests])
        return self.placement.join([v for _, v in results], wanted), [h.version for h, _ in results]

    def _pull_request(self, shard: int, names: list[str] | None, worker: int | None, age: int = 0,
                      at_version: int = 0):
        """The PullRequest for one shard (None: the shard holds none of `names`)."""
        request = ps_pb2.PullRequest(age=age, at_version=at_version)
        if worker is not None:
            request.worker = worker
        if names is not None:
            mine = self._names_on(shard, names)
            if not mine:
                return None
            request.names.extend(mine)
        return request

    def _names_on(self, shard: int, names: list[str]) -> list[str]:
        return [n for n in names if any(b.shard == shard for b in self.placement.variables[n].blocks)]

    def push(self, grads: Mapping[str, Any], versions: list[int], worker: int, seq: int) -> list[PushResult]:
        """Sends one gradient to every shard (even an empty one); per shard, its PushResult."""
        pieces = self.placement.split(grads if self._compress is None else self._compress(grads))

        def one(i, stub, part):
            if _nbytes(part) <= self._unary:
                return _push_result(self._call(stub.PushOne, self._push_message(part, versions[i], worker, seq)))
            return _push_result(self._call(stub.Push, self._push_stream(part, versions[i], worker, seq)))

        return self._each(one, [(p,) for p in pieces])

    def push_pull(self, grads: Mapping[str, Any], versions: list[int], worker: int, seq: int, pull_age: int = 0):
        """Push then pull all variables in one round trip per shard: (results, params, versions).

        `pull_age`: the pull's `age` (controlled staleness; see `pull`).
        """
        return self._send_push_pull(self._push_pull_requests(grads, versions, worker, seq, pull_age=pull_age))

    def push_pull_async(self, grads: Mapping[str, Any], versions: list[int], worker: int, seq: int) -> Future:
        """`push_pull` with the round trip in this client's background thread: a Future of
        (results, params, versions).

        The gradients are encoded before this returns (that copy is the one every push makes), so
        the caller may overwrite `grads` at once. For a worker that computes its next gradient
        while this one travels (cluster.prefetch).
        """
        requests = self._push_pull_requests(grads, versions, worker, seq, eager=True)
        with self._pools_lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-client-bg")
                self._pools.append(self._background)
            background = self._background
        return background.submit(self._send_push_pull, requests)

    def _push_pull_requests(self, grads, versions: list[int], worker: int, seq: int, eager: bool = False,
                            pull_age: int = 0) -> list:
        """Per shard (unary?, request): one message, or the stream's messages (a list if `eager`)."""
        requests = []
        if self._compress is not None:  # error feedback: see asyncps.compression
            grads = self._compress(grads)
        for i, part in enumerate(self.placement.split(grads)):
            if self._pull_bytes[i] <= self._unary and _nbytes(part) <= self._unary:
                requests.append((True, self._push_message(part, versions[i], worker, seq, pull_age)))
            else:
                stream = self._push_stream(part, versions[i], worker, seq, pull_age)
                requests.append((False, list(stream) if eager else stream))
        return requests

    def _send_push_pull(self, requests: list):
        def one(i, stub, unary, request):
            if unary:
                header, values = self._read_pull((self._call(stub.PushPullOne, request),))
            else:
                header, values = self._read_pull(self._call(stub.PushPull, iter(request)))
            return _push_result(header.push), values, header.version

        out = self._each(one, requests)
        params = self.placement.join([values for _, values, _ in out])
        return [r for r, _, _ in out], params, [v for _, _, v in out]

    def _push_stream(self, part, read_version: int, worker: int, seq: int, pull_age: int = 0):
        header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version, pull_age=pull_age)
        return self._stream(part, header.SerializeToString())

    @staticmethod
    def _push_message(part, read_version: int, worker: int, seq: int, pull_age: int = 0) -> bytes:
        header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version, pull_age=pull_age)
        return codec.encode_message(part, header.SerializeToString())

    def stats(self) -> list[ps_pb2.StatsReply]:
        """Every shard's counters (StatsReply messages), by shard index."""
        return self._each(lambda i, stub: self._call(stub.Stats, ps_pb2.StatsRequest()))

    def pause(self) -> list[int]:
        """Pauses update application on every shard; the versions at which they stopped."""
        return self._each(lambda i, stub: self._call(stub.Pause, ps_pb2.PauseRequest()).version)

    def resume(self) -> list[int]:
        """Resumes update application on every shard."""
        return self._each(lambda i, stub: self._call(stub.Resume, ps_pb2.ResumeRequest()).version)

    def snapshot(self) -> list[Snapshot]:
        """Each shard's consistent Snapshot (shard-local blocks), by shard index."""
        return self._each(lambda i, stub: codec.decode_snapshot(self._call(stub.Snapshot, ps_pb2.SnapshotRequest())))

    def restore(self, snapshots: list[Snapshot]) -> list[int]:
        """Restores each shard from its Snapshot; the versions after restore."""

        def one(i, stub, snap):
            return self._call(stub.Restore, codec.encode_snapshot(snap, self._chunk)).version

        return self._each(one, [(s,) for s in snapshots])

    def stop(self, grace: float = 5.0) -> None:
        """Asks every shard process to shut down."""
        self._each(lambda i, stub: self._call(stub.Stop, ps_pb2.StopRequest(grace=grace)))

    def close(self) -> None:
        """Closes the channels, then the thread pools.

        Channels first: a call still in flight (a push waiting at a paused or stopped shard)
        ends at once with CANCELLED instead of holding a pool thread until its deadline.
        """
        for channel in self._channels:
            channel.close()
        with self._pools_lock:
            pools, self._pools = self._pools, []
        for pool in pools:
            pool.shutdown(wait=True)

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
