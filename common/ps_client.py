"""The client of all parameter-server shards: split, send in parallel, join.

    client = PSClient(["127.0.0.1:50051", "127.0.0.1:50052"], placement, cfg)
    client.init(initial_params)              # full arrays by name; first initializer wins
    client.register(worker)                  # once, with the index the chief assigned
    params, versions = client.pull(worker=worker)
    params, versions = client.pull(worker=worker, age=r)  # controlled staleness: r versions ago
    results = client.push(grads, versions, worker, seq)   # seq = 0, 1, 2, ... per worker
    results, params, versions = client.push_pull(grads, versions, worker, seq, pull_age=r)
    future = client.push_pull_async(grads, versions, worker, seq)  # the same, in the background

Id-keyed tables (docs/sparse.md; `tables` = {name: dim} given to the constructor):

    params, versions, rows = client.pull_with_rows({"t": ids}, worker=worker)  # rows["t"] = (values, row versions)
    results, params, versions, rows = client.push_pull_rows(grads, versions, worker, seq,
                                                            table_grads={"t": TableGrad(ids, g, read)},
                                                            table_ids={"t": next_ids})

Each id goes to (and comes from) the shard `partition.table_owners` names; rows travel in the
headers (protos/table_rows.py), on every transport. The ids of one call must be unique.

`versions` is a list with one shard version per shard (see protos/ps.proto). Gradients are full
arrays or `SparseRows` with global row indices; the placement cuts them per shard and joins
pulled blocks back. Every shard gets every push, even an empty one, so that ssp clocks advance.

Transport: a call whose request and reply both fit in `unary_bytes` (UNARY_BYTES, 4 MiB) uses the
unary twin (PullOne, PushOne, PushPullOne: one message each way); larger ones stream 1 MiB
chunks. For MLP-sized pushes the unary path costs about half the client CPU of a stream (no
request-iterator thread, one send per direction; see docs/performance.md). A push-pull of that
size goes, message after message, on a stream held open per shard (PushPullSession,
common/ps_session.py: the same messages without a call's setup each step); anything that ends
such a session before it answers sends the request as PushPullOne.

gRPC: channels are made in the constructor, so build the client inside the process that uses it
(never before a fork). Every call has a deadline (``cluster.rpc_timeout``) and waits for the
shard to become ready; the channel's service config retries UNAVAILABLE and RESOURCE_EXHAUSTED
(a shard's stream limits or byte budget; all shard calls are idempotent: pushes by (worker, seq),
Init by first-wins). Errors surface as grpc.RpcError with the shard's status code and message;
`RETRIED_CODES` are those a worker recovers from by rejoining.

Shared memory (``cluster.transport``: auto, the default, or shm; common/shm.py): after
`register(worker)` the client proves to each shard, by the handshake of ps.proto's ShmOpen, that
they share a host; a worker's pulls, pushes and push-pulls to that shard then carry their
tensors in the segment and only a small control message: over the Unix socket the shard offers
(common/shm_control.py), else as a gRPC call (ShmPushPull); sparse rows too, their indices in the
control message. Everything else (the chief's pulls at_version, Init, snapshots, pushes of a
client that registered no worker) stays on gRPC. With auto, a failed handshake (another host, no
/dev/shm, a shard with transport grpc, a wrong proof) is logged once and the shard is used
over gRPC; with shm it raises `ShmUnavailable` (one line). An error of a shared-memory call
drops the segment: the next call after `register` opens a new one.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import grpc
import numpy as np

from asyncps.config import ClusterConfig, Config
from asyncps.protos import codec, ps_pb2, table_rows
from asyncps.protos.table_rows import TableGrad
from asyncps.protos.rpc import ps_stub
from asyncps.ps_session import Session
from asyncps.shard_types import PushResult, Snapshot
from asyncps.shm_peer import AT_LAYOUT, ShmLinks, ShmPeer, ShmUnavailable, write_push
from asyncps.table_router import TableRouter
from asyncps.sparse import SparseRows

logger = logging.getLogger(__name__)

__all__ = ["PSClient", "PushResult", "ShmUnavailable", "SparseRows", "Snapshot", "TableGrad", "channel_options"]

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
    }, {
        # a worker's session (common/ps_session.py) is not retried: one that cannot open hands its
        # request to PushPullOne at once, which retries as above (retrying the session first cost
        # about 1.5 s of backoff whenever the shard's stream slots were full)
        "name": [{"service": "asyncps.ParameterServer", "method": "PushPullSession"}],
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


def _shm_request(peer: ShmPeer, header: ps_pb2.PushHeader, tensors, pull: bool) -> ps_pb2.ShmRequest:
    """A push (and pull of every variable) whose gradients `write_push` placed: at the segment's
    layout (AT_LAYOUT), or described by their ShmTensors."""
    if tensors is AT_LAYOUT:
        return ps_pb2.ShmRequest(generation=peer.generation, push=header, pull=pull, at_layout=True)
    return ps_pb2.ShmRequest(generation=peer.generation, push=header, tensors=tensors, pull=pull)


def _push_result(reply: ps_pb2.PushReply) -> PushResult:
    return PushResult(ps_pb2.PushReply.Result.Name(reply.result), reply.version, reply.staleness)


class PSClient:
    """Talks to every shard of a cluster; see the module docstring.

    `placement` is an ``asyncps.partition.Placement`` (anything with ``num_shards``,
    ``split(tensors)`` and ``join(pieces, names)``); `cfg` the run's cluster section (a
    ClusterConfig: rpc_timeout, security, compression, transport; a whole Config is accepted and
    its cluster section taken, for callers that hold one); `transport`
    ("auto", "grpc", "shm") replaces its cluster.transport (tests and benches that measure one path).
    """

    def __init__(self, addresses: list[str], placement, cfg: ClusterConfig | Config, chunk_bytes: int = codec.CHUNK_BYTES,
                 unary_bytes: int = UNARY_BYTES, transport: str | None = None, tables: Mapping[str, int] | None = None,
                 sessions: bool = True):
        if len(addresses) != placement.num_shards:
            raise ValueError(f"{len(addresses)} shard addresses for a placement of {placement.num_shards} shards")
        self.addresses = list(addresses)
        self.placement = placement
        self.tables = dict(tables or {})  # id-keyed tables: {name: dim}
        self._rows = TableRouter(self.tables, placement.num_shards)  # which shard owns which ids
        cluster = cfg.cluster if isinstance(cfg, Config) else cfg  # the only section a client reads
        self.timeout = cluster.rpc_timeout
        self._chunk = chunk_bytes
        # Transfers whose both directions fit in `unary_bytes` use the unary ...One methods.
        shard_bytes = getattr(placement, "shard_bytes", None)
        self._pull_bytes = shard_bytes() if shard_bytes is not None else [float("inf")] * placement.num_shards
        self._unary = unary_bytes
        # pulled values that arrive in pieces land in reused memory: room for two pulls of
        # everything (the one the caller holds and the next), or 1 GiB when the sizes are unknown
        pull_bytes = sum(self._pull_bytes)
        self._receive_buffers = codec.BufferPool(2 * int(pull_bytes) if pull_bytes < float("inf") else 1 << 30)
        from asyncps.protos.security import open_channel, resolve  # TLS/mTLS and the job token: cluster.security
        security = resolve(cluster.security)
        self._channels = [open_channel(a, security, channel_options()) for a in self.addresses]
        self._stubs = [ps_stub(c) for c in self._channels]  # tensor streams as codec wire bytes
        # unary-sized push-pulls on a stream held open per shard (common/ps_session.py);
        # `sessions` False: each as its own PushPullOne call
        self._sessions = [Session(stub.PushPullSession, functools.partial(self._call, stub.PushPullOne), self.timeout,
                                  f"shard {i} ({address})")
                          for i, (stub, address) in enumerate(zip(self._stubs, self.addresses))] if sessions else None
        # One small pool per calling thread: a call that waits at a shard (ssp/sync pull) must
        # not hold a thread that another caller of this client needs (a shared pool deadlocks).
        self._local = threading.local()
        self._pools: list[ThreadPoolExecutor] = []
        self._pools_lock = threading.Lock()
        self._background: ThreadPoolExecutor | None = None  # push_pull_async
        from asyncps.compression import make_compressor  # cluster.compression: 16-bit pushes
        self._compress = make_compressor(getattr(cluster, "compression", "none"))
        # shared memory (module docstring; common/shm_peer.py): which shards, the segments
        self.transport: str = transport or str(getattr(cluster, "transport", "grpc"))  # `transport`: overrides cfg
        self._shm = ShmLinks(self.addresses, self.transport, security.token, self.timeout, self._call)

    @property
    def pulled_views(self) -> bool:
        """True: values pulled through shared memory are read-only views of the segment, not
        copies; they hold what was pulled until this client's next call to that shard (which
        writes the segment again). For a loop that is done with its weights before it calls
        again (the worker's, without cluster.prefetch); False (default): copies, kept at will."""
        return self._shm.views

    @pulled_views.setter
    def pulled_views(self, on: bool) -> None:
        self._shm.views = bool(on)

    def push_buffers(self, worker: int, names: list[str]) -> dict[str, np.ndarray]:
        """Arrays to compute `worker`'s next dense gradients in, where they go through shared
        memory: the places in each shard's segment where the push puts them (ShmPeer.push_at),
        so a push of gradients computed there copies nothing.

        Only for a loop that computes its next gradient after its last call returned (the
        worker's, without cluster.prefetch): the arrays are the segment, which the next push
        hands to the shard. Variables split across shards, compressed pushes and shards not on
        shared memory (or not opened yet) get none; their gradients are copied as usual. The
        arrays change with the segments (a new handshake): ask again each step (cheap)."""
        if self._compress is not None or worker != self._shm.worker:
            return {}
        out: dict[str, np.ndarray] = {}
        for peer in self._shm.peers:
            if isinstance(peer, ShmPeer) and not peer.closed:
                out.update((n, peer.push_at[n]) for n in names
                           if n in peer.push_at and not self.placement.variables[n].split)
        return out

    def shm_shards(self) -> list[bool]:
        """Per shard: True when this client's calls to it travel through shared memory."""
        return self._shm.shards()

    # ------------------------------------------------------------------------------------------
    # Plumbing

    def _call(self, stub_method, request, **kw):
        """One call with this client's deadline and wait_for_ready."""
        return stub_method(request, timeout=self.timeout, wait_for_ready=True, **kw)

    def _each(self, fn, args_per_shard=None) -> list:
        """fn(shard_index, stub[, args]) on every shard in parallel; results by shard index.

        Shard 0 runs in the calling thread, the others in this thread's own pool. Every shard's
        call has ended when this returns or raises (the first error in shard order): a call left
        running behind an error would go on (a handshake half done, a push applied) after the
        caller has moved on, or closed the client. Each call has a deadline, so the wait is bounded.
        """
        args = args_per_shard or [()] * len(self._stubs)
        jobs = list(enumerate(zip(self._stubs, args)))
        futs = [self._my_pool().submit(fn, i, stub, *a) for i, (stub, a) in jobs[1:]]
        try:
            first = fn(0, jobs[0][1][0], *jobs[0][1][1])
        finally:
            wait(futs)
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

    def _read_pull(self, replies) -> tuple[ps_pb2.PullHeader, dict]:
        """(header, values) of a Pull/PushPull reply stream (wire bytes). Values that arrive in
        pieces are reassembled in this client's reused buffers (a caller that keeps a pulled
        array keeps its buffer; see codec.BufferPool)."""
        asm, header = codec.Assembler(pool=self._receive_buffers), None
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
        header = ps_pb2.InitHeader(tables=[ps_pb2.TableSpec(name=n, dim=d) for n, d in sorted(self.tables.items())])
        raw = header.SerializeToString() if self.tables else None  # a dense run's Init stays as it was

        def one(i, stub, values):
            return self._call(stub.Init, self._stream(values, raw)).created

        return self._each(one, [(p,) for p in pieces])

    def register(self, worker: int, retire: bool = False) -> list[tuple[int, int]]:
        """Registers (or retires) `worker` with every shard; per shard (clock, last_seq)."""
        request = ps_pb2.RegisterWorkerRequest(worker=worker, retire=retire)
        if not retire:
            self._shm.registered(worker)

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
        params, versions, _ = self._pull(names, worker, age, at_version, None)
        return params, versions

    def pull_with_rows(self, table_ids: Mapping[str, Any], names: list[str] | None = None, worker: int | None = None,
                       age: int = 0, at_version: int = 0) -> tuple[dict, list[int], dict]:
        """`pull`, plus the rows of the unique `table_ids` ({table: ids}) from the shards that
        own them: (params, versions, {table: (rows, row versions)}), rows in the order of the ids.
        A worker's pull makes missing rows; the chief's (no `worker`) makes none."""
        return self._pull(names, worker, age, at_version, table_ids)

    def pull_rows(self, table_ids: Mapping[str, Any], worker: int | None = None) -> dict:
        """Only the rows of the unique `table_ids` ({table: ids}): {table: (rows, row versions)}.
        The chief's (no `worker`) make no rows: an unseen id reads its first values, version 0."""
        return self._pull(None, worker, 0, 0, table_ids, values=False)[2]

    def _pull(self, names, worker, age, at_version, table_ids, values: bool = True):
        wanted = list(self.placement.variables) if names is None else list(names)
        requests = [self._pull_request(i, names, worker, age, at_version) for i in range(len(self._stubs))]
        asked, positions = self._rows.split_ids(table_ids)
        for i, request in enumerate(requests):
            if (request is None or not values) and asked[i]:  # rows only from this shard
                requests[i] = request = ps_pb2.PullRequest(age=age, at_version=at_version, no_values=True)
                if worker is not None:
                    request.worker = worker
            elif not values:
                requests[i] = request = None
            if request is not None:
                request.tables.extend(asked[i])

        def one(i, stub, req):
            if req is None:
                return ps_pb2.PullHeader(version=-1), {}
            peer = self._shm.peer(i, stub, worker) if not at_version else None
            if peer is not None:
                if not req.no_values:  # (a rows-only pull goes over gRPC: the segment has no such request)
                    everything = not req.names and bool(peer.pull_at)  # at the segment's layout
                    out = self._shm.call(i, stub, peer, ps_pb2.ShmRequest(
                        generation=peer.generation, pull=True, worker=worker, age=age, names=req.names,
                        tables=req.tables, at_layout=everything))
                    if out is not None:
                        return out
            if self._pull_bytes[i] + self._rows.nbytes(req.tables) <= self._unary:
                return self._read_pull((self._call(stub.PullOne, req),))
            return self._read_pull(self._call(stub.Pull, req))

        results = self._each(one, [(r,) for r in requests])
        rows = self._rows.join(table_ids, positions, [h for h, _ in results])
        if not values:
            return {}, [], rows
        return self.placement.join([v for _, v in results], wanted), [h.version for h, _ in results], rows

    # -- id-keyed tables ------------------------------------------------------------------------

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
            peer = self._shm.peer(i, stub, worker)
            tensors = write_push(peer, part)  # holds peer.lock when not None
            if peer is not None and tensors is not None:
                header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=versions[i])
                request = _shm_request(peer, header, tensors, pull=False)
                header, _ = self._shm.call(i, stub, peer, request, locked=True)
                return _push_result(header.push)
            if _nbytes(part) <= self._unary:
                return _push_result(self._call(stub.PushOne, self._push_message(part, versions[i], worker, seq)))
            return _push_result(self._call(stub.Push, self._push_stream(part, versions[i], worker, seq)))

        return self._each(one, [(p,) for p in pieces])

    def push_pull(self, grads: Mapping[str, Any], versions: list[int], worker: int, seq: int, pull_age: int = 0):
        """Push then pull all variables in one round trip per shard: (results, params, versions).

        `pull_age`: the pull's `age` (controlled staleness; see `pull`).
        """
        return self._send_push_pull(self._push_pull_requests(grads, versions, worker, seq, pull_age=pull_age))[:3]

    def push_pull_rows(self, grads: Mapping[str, Any], versions: list[int], worker: int, seq: int,
                       table_grads: Mapping[str, TableGrad] | None = None, table_ids: Mapping[str, Any] | None = None,
                       pull_age: int = 0):
        """`push_pull` that also pushes row gradients of id-keyed tables (`table_grads`, unique
        ids) and pulls the rows of `table_ids` (the worker's next batch) in the same round trip:
        (results, params, versions, {table: (rows, row versions)})."""
        pushed = self._rows.split_grads(table_grads)
        asked, positions = self._rows.split_ids(table_ids)
        requests = self._push_pull_requests(grads, versions, worker, seq, pull_age=pull_age,
                                            tables=list(zip(pushed, asked)))
        results, params, versions_after, headers = self._send_push_pull(requests)
        return results, params, versions_after, self._rows.join(table_ids, positions, headers)

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
        return background.submit(lambda: self._send_push_pull(requests)[:3])

    def _push_pull_requests(self, grads, versions: list[int], worker: int, seq: int, eager: bool = False,
                            pull_age: int = 0, tables: list | None = None) -> list:
        """Per shard (kind, request): "shm" ((peer, ShmRequest), the gradients already in the
        segment and its lock held until the call ends), "one" (one message) or "stream" (the
        stream's messages, a list if `eager`). `tables`: per shard (TableRows pushed, TableRows
        of ids to pull), carried in the push header."""
        if self._compress is not None:  # error feedback: see asyncps.compression
            grads = self._compress(grads)
        peers = [self._shm.peer(i, stub, worker) for i, stub in enumerate(self._stubs)]  # may open segments
        requests: list[tuple[str, Any]] = []
        try:
            for i, part in enumerate(self.placement.split(grads)):
                pushed, asked = tables[i] if tables else ((), ())
                extra = table_rows.nbytes(pushed) + self._rows.nbytes(asked)
                peer = peers[i]
                tensors = write_push(peer, part)
                if peer is not None and tensors is not None:
                    header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=versions[i], pull_age=pull_age,
                                               table_grads=pushed, table_pull=asked)
                    requests.append(("shm", (peer, _shm_request(peer, header, tensors, pull=True))))
                elif self._pull_bytes[i] <= self._unary and _nbytes(part) + extra <= self._unary:
                    requests.append(("one", self._push_message(part, versions[i], worker, seq, pull_age, pushed, asked,
                                                               wait_s=self.timeout)))
                else:
                    stream = self._push_stream(part, versions[i], worker, seq, pull_age, pushed, asked)
                    requests.append(("stream", list(stream) if eager else stream))
        except BaseException:
            for kind, request in requests:
                if kind == "shm":
                    request[0].lock.release()
            raise
        return requests

    def _send_push_pull(self, requests: list):
        def one(i, stub, kind, request):
            if kind == "shm":
                peer, shm_request = request
                header, values = self._shm.call(i, stub, peer, shm_request, locked=True)
            elif kind == "one":
                reply = self._sessions[i].call(request) if self._sessions else self._call(stub.PushPullOne, request)
                header, values = self._read_pull((reply,))
            else:
                header, values = self._read_pull(self._call(stub.PushPull, iter(request)))
            return _push_result(header.push), values, header.version, header

        if len(requests) > 1 and all(kind == "shm" and request[0].control is not None for kind, request in requests):
            out = [(_push_result(header.push), values, header.version, header)
                   for header, values in self._shm.scatter_gather([request for _, request in requests])]
        else:
            out = self._each(one, requests)
        params = self.placement.join([values for _, values, _, _ in out])
        return [r for r, _, _, _ in out], params, [v for _, _, v, _ in out], [h for _, _, _, h in out]

    def _push_stream(self, part, read_version: int, worker: int, seq: int, pull_age: int = 0, table_grads=(),
                     table_pull=()):
        header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version, pull_age=pull_age,
                                   table_grads=table_grads, table_pull=table_pull)
        return self._stream(part, header.SerializeToString())

    @staticmethod
    def _push_message(part, read_version: int, worker: int, seq: int, pull_age: int = 0, table_grads=(),
                      table_pull=(), wait_s: float = 0.0) -> bytes:
        """One PushOne/PushPullOne request; `wait_s` bounds its waits on the shard when it travels
        on a session (the unary calls' deadline does it for them)."""
        header = ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version, pull_age=pull_age,
                                   table_grads=table_grads, table_pull=table_pull, wait_s=wait_s)
        return codec.encode_message(part, header.SerializeToString())

    def stats(self, hot_ids: bool = False) -> list[ps_pb2.StatsReply]:
        """Every shard's counters (StatsReply messages), by shard index; `hot_ids`: with each
        id-keyed table's hottest ids (a pass over its rows)."""
        request = ps_pb2.StatsRequest(hot_ids=hot_ids)
        return self._each(lambda i, stub: self._call(stub.Stats, request))

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

    def snapshot_table(self, shard: int, name: str, chunk_rows: int = 65536):
        """(updates, chunks) of table `name` on `shard`: its update count and an iterator of its
        rows in chunks ({"ids", "versions", "values", "slots"}), streamed: one chunk in memory."""
        replies = self._call(self._stubs[shard].SnapshotTable, ps_pb2.TableSnapshotRequest(table=name,
                                                                                           chunk_rows=chunk_rows))
        first = next(replies)
        dim = first.spec.dim

        def chunks():
            for message in itertools.chain([first], replies):
                if len(message.rows.ids):
                    yield table_rows.read_chunk(message, dim)

        return int(first.updates), chunks()

    def restore_table(self, shard: int, name: str, dim: int, updates: int, chunks) -> int:
        """Stages table `name` on `shard` from `chunks` (as `snapshot_table` gives them, rows
        the shard owns by hash only); the next `restore` installs it."""
        def messages():
            yield table_rows.chunk_message(name, dim, updates, None, True)
            for c in chunks:
                yield table_rows.chunk_message(name, dim, 0, c, False)

        return self._call(self._stubs[shard].RestoreTable, messages()).version

    def stop(self, grace: float = 5.0) -> None:
        """Asks every shard process to shut down."""
        self._each(lambda i, stub: self._call(stub.Stop, ps_pb2.StopRequest(grace=grace)))

    def close(self) -> None:
        """Closes the channels, then the thread pools, then unmaps the segments.

        Channels first: a call still in flight (a push waiting at a paused or stopped shard)
        ends at once with CANCELLED instead of holding a pool thread until its deadline.
        """
        for session in self._sessions or ():
            session.close()
        for channel in self._channels:
            channel.close()
        self._shm.interrupt()  # a control call in flight ends as a gRPC call does: at once
        with self._pools_lock:
            pools, self._pools = self._pools, []
        for pool in pools:
            pool.shutdown(wait=True)
        self._shm.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
