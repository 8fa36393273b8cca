"""The thin gRPC layer over `Shard`: decode messages, call the shard, encode the answer.

Tensor streams arrive and leave as wire bytes (see `asyncps.protos.rpc`): requests are parsed
by `codec.Assembler.add_wire`, replies built by `codec.encode_wire`.

Every ShardError or CodecError becomes ``context.abort(code, message)``; no error travels as
text in a reply field. Waits inside the shard (ssp bound, sync round, pause) are bounded by the
call's own deadline (``context.time_remaining()``).

Memory of pushes: the header is read first (an unknown worker or an uninitialized shard is
refused before any tensor), then every tensor's declaration is checked against the shard's
variables (`validate.check_declared`: name, dtype, shape, row count) before the codec allocates
anything for it, and the bytes of streamed pushes in flight are charged to the shard's
`ByteBudget` (refused with RESOURCE_EXHAUSTED when spent). A failed or cancelled stream drops
what it received at once (`Assembler.clear`). A later Init is checked the same way against the
variables; the first Init and Restore (the chief's) are not capped.

Shared memory (cluster.transport auto/shm): ShmOpen and ShmPushPull go to the `ShmEndpoint`
(ps/shm_transport.py) given as `shm`; without one (transport grpc, or no /dev/shm) ShmOpen
answers UNIMPLEMENTED and the worker stays on gRPC.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np

from asyncps.protos import codec, ps_pb2
from asyncps.protos.codec import CodecError
from asyncps.protos.serving import StreamExpired
from asyncps.ps import table_wire, validate
from asyncps.ps.errors import ShardError
from asyncps.ps.shard import Shard

SERVICE_NAME = "asyncps.ParameterServer"  # also the name the health service reports


def _abort(context: grpc.ServicerContext, err: Exception) -> None:
    code = grpc.StatusCode[err.code] if isinstance(err, ShardError) else grpc.StatusCode.INVALID_ARGUMENT
    context.abort(code, str(err))


def _rpc(method):
    """Maps domain errors of a unary- or stream-answering handler to gRPC status codes."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except (ShardError, CodecError) as err:
                _abort(context, err)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except (ShardError, CodecError) as err:
            _abort(context, err)

    return unary


def _message_deadline(header: ps_pb2.PushHeader, session_start: float | None) -> float | None:
    """A session message's own deadline (monotonic seconds): its arrival + the header's wait_s."""
    return session_start + header.wait_s if session_start is not None and header.wait_s > 0 else None


def _time_left(context: grpc.ServicerContext, deadline: float | None) -> float | None:
    """Seconds the call may still wait: its deadline's, or fewer where a session message's own
    deadline comes first (None: no deadline at all)."""
    left = context.time_remaining()
    if deadline is None:
        return left
    mine = max(0.0, deadline - time.monotonic())
    return mine if left is None else min(left, mine)


def push_reply(result) -> ps_pb2.PushReply:
    """The wire form of a PushResult (also the control socket's, ps/shm_transport.py)."""
    return ps_pb2.PushReply(
        result=ps_pb2.PushReply.Result.Value(result.result), version=result.version, staleness=result.staleness
    )


MIN_PUSH_BYTES = 256 << 20  # the byte budget's floor (see ByteBudget)


class ByteBudget:
    """Bytes of streamed pushes a shard holds at once: each tensor's declared size is charged
    when it is declared (before its buffer exists), a header carrying table rows when it is read,
    and all of it is returned when the push is done.

    `limit`: a fixed number of bytes, or None for max(MIN_PUSH_BYTES, 2 * (workers + 1) * the
    shard's variable bytes), room for every worker's push twice over.
    """

    def __init__(self, shard: Shard, workers: int, limit: int | None = None):
        self._shard, self._workers, self._fixed = shard, workers, limit
        self._lock = threading.Lock()
        self.in_use = 0
        self.refused = 0
        self._sized: tuple[int, int] = (0, 0)  # (id of the shard's variable dict, its bytes)

    @property
    def limit(self) -> int:
        if self._fixed is not None:
            return self._fixed
        variables = self._shard.variables
        if self._sized[0] != id(variables):  # the dict is replaced by init and restore only
            self._sized = (id(variables), sum(v.value.nbytes for v in variables.values()))
        return max(MIN_PUSH_BYTES, 2 * (self._workers + 1) * self._sized[1])

    @contextlib.contextmanager
    def lease(self):
        """A `take(n)` callable whose charges are all returned when the block ends."""
        taken = [0]

        def take(n: int) -> None:
            with self._lock:
                limit = self.limit
                if self.in_use + n > limit:
                    self.refused += 1
                    raise validate.ResourceExhausted(
                        f"shard {self._shard.index}: no room for a push of {n} more bytes ({self.in_use} of "
                        f"{limit} bytes of pushes in flight); try again")
                self.in_use += n
            taken[0] += n

        try:
            yield take
        finally:
            with self._lock:
                self.in_use -= taken[0]


class ParameterServerServicer:
    """gRPC handlers of the ParameterServer service (see protos/ps.proto) over one Shard.

    `push_bytes`: the ByteBudget's limit (None: sized from the shard's variables).
    """

    def __init__(self, shard: Shard, on_stop: Callable[[float], None] | None = None,
                 chunk_bytes: int = codec.CHUNK_BYTES, push_bytes: int | None = None, shm=None):
        self._shard = shard
        self.shm = shm  # a ShmEndpoint, or None: no shared-memory transport
        self._on_stop = on_stop
        self._chunk = chunk_bytes
        self.budget = ByteBudget(shard, shard.num_workers, push_bytes)
        self._declared: tuple[Mapping | None, set] = (None, set())  # (the shard's variables, valid dense declarations)
        # pull snapshots and reassembled pushes: buffers reused once dropped (codec.BufferPool)
        self._pool = codec.BufferPool()
        self._pushes_lock = threading.Lock()
        self.grpc_pushes = 0  # pushes answered whose gradients came in gRPC messages (StatsReply)

    @_rpc
    def Init(self, request_iterator, context):
        """Creates the variables from the streamed initial values (first Init wins)."""
        asm, tables = codec.Assembler(self._init_admission()), {}
        try:
            for message in request_iterator:
                raw = asm.add_wire(message)
                if raw:  # the header: the id-keyed tables
                    header = codec.parse_header(ps_pb2.InitHeader, raw)
                    tables = {t.name: t.dim for t in header.tables}
            values = {name: codec.dense(v, repr(name)) for name, v in asm.finish().items()}
        except BaseException:
            asm.clear()
            raise
        created = self._shard.init(values, tables)
        return ps_pb2.InitReply(created=created, num_variables=self._shard.num_variables, version=self._shard.version)

    @_rpc
    def RegisterWorker(self, request, context):
        """Makes a worker index known to the shard, or retires it."""
        clock, last_seq = self._shard.register_worker(request.worker, request.retire)
        return ps_pb2.RegisterWorkerReply(clock=clock, last_seq=last_seq)

    @_rpc
    def Pull(self, request, context):
        """Streams the requested values with the shard version (may wait: ssp/sync)."""
        worker = request.worker if request.HasField("worker") else None
        yield from self._shard.pull(worker, request.names, context.time_remaining(), self._export(), age=request.age,
                                    at_version=request.at_version, tables=self._wanted(request.tables),
                                    with_values=not request.no_values)

    @_rpc
    def Push(self, request_iterator, context):
        """Applies one streamed gradient; answers APPLIED/ACCUMULATED/DROPPED/DUPLICATE."""
        return push_reply(self._push(request_iterator, context))

    @_rpc
    def PushPull(self, request_iterator, context):
        """Push, then pull all values, in one round trip."""
        result, header = self._push(request_iterator, context, with_header=True)
        yield from self._shard.pull(header.worker, (), context.time_remaining(), self._export(push_reply(result)),
                                    age=header.pull_age, tables=self._wanted(header.table_pull))

    @_rpc
    def PullOne(self, request, context):
        """Pull as one unary reply message (all values unchunked)."""
        worker = request.worker if request.HasField("worker") else None
        return self._shard.pull(worker, request.names, context.time_remaining(), self._export(one=True),
                                age=request.age, at_version=request.at_version, tables=self._wanted(request.tables),
                                    with_values=not request.no_values)

    @_rpc
    def PushOne(self, request, context):
        """Push of one message (all gradients unchunked)."""
        return push_reply(self._push((request,), context, streamed=False))

    @_rpc
    def PushPullOne(self, request, context):
        """PushPull with one request and one reply message."""
        return self._push_pull_one(request, context)

    @_rpc
    def PushPullSession(self, request_iterator, context):
        """PushPullOne, message after message on one stream held open (a worker's session, see
        protos/ps.proto): each push and its pull wait on the shard at most the header's `wait_s`;
        an error ends the stream with the status PushPullOne would have returned.

        Ends cleanly (no error) when the stream guard ends it (idle past its limit, or the shard
        stopping: ShardServer.stop) or the shard is stopping when a message comes: the client
        sends a request caught in that end as PushPullOne (common/ps_session.py), which a
        stopping server refuses like any new call."""
        try:
            for request in request_iterator:
                if self._shard.stopping:
                    return
                yield self._push_pull_one(request, context, session_start=time.monotonic())
        except StreamExpired:
            return

    def _push_pull_one(self, request, context, session_start: float | None = None) -> bytes:
        result, header = self._push((request,), context, with_header=True, streamed=False, session_start=session_start)
        deadline = _message_deadline(header, session_start)
        return self._shard.pull(header.worker, (), _time_left(context, deadline),
                                self._export(push_reply(result), one=True), age=header.pull_age,
                                tables=self._wanted(header.table_pull))

    def _export(self, pushed: ps_pb2.PushReply | None = None, one: bool = False):
        """What the shard runs under its lock on the values of a pull.

        With `one`: the single reply message, encoded there (its one copy of the values is the
        snapshot a consistent pull needs; encoding it outside would take a second copy).

        Streamed: a memcpy of every value into a reused snapshot buffer, and a generator that
        encodes and yields the messages one at a time after the lock is released, so gRPC sends
        the first while the rest are not built, and each 1 MiB message reuses the memory the
        previous one freed. Building all of them under the lock, as before, held the lock for
        the whole encode and wrote 256 fresh 1 MiB objects for a 256 MiB pull (docs/performance.md,
        section 3: 0.17 s of the pull against 0.03 s for snapshot plus lazy encode).
        """

        def export(version, values, rows=None):
            if one:
                header = ps_pb2.PullHeader(version=version, push=pushed, tables=table_wire.answer(rows))
                return codec.encode_message(values, header.SerializeToString())
            return self._stream_reply(version, pushed, self._snapshot(values), rows)

        return export

    def _snapshot(self, values) -> dict:
        """Copies of `values` (under the shard's lock), the large ones in pooled buffers."""
        out = {}
        for name, value in values.items():
            if value.nbytes < self._pool.min_bytes:
                out[name] = value.copy()
            else:
                copy = self._pool.take(value.nbytes).view(value.dtype).reshape(value.shape)
                np.copyto(copy, value)
                out[name] = copy
        return out

    def _stream_reply(self, version: int, pushed, values: dict, rows):
        """The reply messages of a streamed pull, encoded as gRPC asks for them (no lock held);
        `values` are this pull's own copies (their buffers go back to the pool with them)."""
        header = ps_pb2.PullHeader(version=version, push=pushed, tables=table_wire.answer(rows))
        yield from codec.encode_wire(values, header.SerializeToString(), self._chunk)

    def _wanted(self, messages) -> dict | None:
        """{table: ids} a pull asks for (None: no table rows)."""
        return table_wire.requested_ids(messages, self._shard.tables) if len(messages) else None

    def _push(self, request_iterator, context, with_header=False, streamed=True, session_start: float | None = None):
        # streamed: charged to the byte budget (a unary push is one message, already received
        # whole and bounded by the server's message limit). session_start: when a session's
        # message arrived (its header's wait_s counts from then)
        with self.budget.lease() if streamed else contextlib.nullcontext() as take:
            header, grads = self._read_push(request_iterator, take)
            result = self._shard.push(header.worker, header.seq, header.read_version, grads,
                                      _time_left(context, _message_deadline(header, session_start)))
            del grads
        with self._pushes_lock:
            self.grpc_pushes += 1
        return (result, header) if with_header else result

    def _read_push(self, request_iterator, take=None):
        """(header, gradients) of a push stream; a malformed stream is counted as rejected.

        The header comes first: an unknown worker is refused before any tensor; every tensor's
        declaration is then validated (and charged to `take`) before anything is allocated."""
        messages = iter(request_iterator)
        first = next(messages, None)
        if first is None:
            raise CodecError("empty push stream (no header)")
        raw = codec.read_header(first)  # read first, so a malformed tensor is counted against its worker
        if raw is None:
            raise CodecError("the first message of a push carries no header")
        header = codec.parse_header(ps_pb2.PushHeader, raw)
        self._check_pusher(header.worker)
        if take is not None and len(header.table_grads):
            # a table's rows ride in the header (docs/sparse.md): held for the whole push like a
            # tensor, so charged like one (the header and the rows decoded from it: twice its size)
            take(2 * len(raw))
        asm = codec.Assembler(self._push_admission(take), self._pool)
        try:
            try:
                for message in itertools.chain((first,), messages):
                    asm.add_wire(message)
                grads: dict[str, Any] = asm.finish()
                if len(header.table_grads):
                    grads.update(table_wire.pushed_rows(header.table_grads, self._shard.tables))
            except (CodecError, ShardError):
                self._shard.count_rejected(header.worker)
                raise
            return header, grads
        except BaseException:  # refused, malformed, cancelled or timed out: free what arrived now
            asm.clear()
            raise

    def _check_pusher(self, worker: int) -> None:
        """An initialized shard and a registered, active worker (as `Shard.push` checks)."""
        self._shard.check_pusher(worker)

    def _push_admission(self, take) -> codec.Admit:
        variables = self._shard.variables  # fixed once initialized (restore swaps in a new dict)
        if self._declared[0] is not variables:
            self._declared = (variables, set())
        valid = self._declared[1]  # declarations found valid (the shape includes a sparse row count)

        def admit(name, slot, dtype, shape, sparse, nbytes):
            key = (name, slot, dtype, shape, sparse)
            if key not in valid:
                validate.check_declared(name, slot, dtype, shape, sparse, variables)
                if len(valid) < 1 << 12:
                    valid.add(key)
            if take is not None:
                take(nbytes)

        return admit

    def _init_admission(self) -> codec.Admit | None:
        """A later Init must match the variables (Shard.init): checked before allocating."""
        if not self._shard.num_variables:
            return None
        variables = self._shard.variables

        def admit(name, slot, dtype, shape, sparse, nbytes):
            validate.check_declared_value(name, slot, dtype, shape, sparse, variables)

        return admit

    @_rpc
    def ShmOpen(self, request, context):
        """Shared-memory handshake, step 1 (create a segment) or 2 (check the proof)."""
        if self.shm is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"shard {self._shard.index}: shared-memory transport off (cluster.transport grpc)")
        return self.shm.open(request)

    @_rpc
    def ShmPushPull(self, request, context):
        """Push and/or pull with the tensors in the worker's segment."""
        if self.shm is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"shard {self._shard.index}: shared-memory transport off")
        return self.shm.push_pull(request, context.time_remaining)

    @_rpc
    def Pause(self, request, context):
        """Stops applying updates (pushes wait); returns once none is in progress."""
        return ps_pb2.PauseReply(version=self._shard.pause())

    @_rpc
    def Resume(self, request, context):
        """Resumes applying updates."""
        return ps_pb2.ResumeReply(version=self._shard.resume())

    @_rpc
    def Snapshot(self, request, context):
        """Streams values, slots and counters, all at one version."""
        yield from codec.encode_snapshot(self._shard.snapshot(), self._chunk)

    @_rpc
    def Restore(self, request_iterator, context):
        """Replaces the shard's state with the streamed snapshot."""
        return ps_pb2.RestoreReply(version=self._shard.restore(codec.decode_snapshot(request_iterator)))

    @_rpc
    def SnapshotTable(self, request, context):
        """Streams one table's rows, slots and versions in chunks (the chief, shards paused)."""
        updates, chunks = self._shard.table_chunks(request.table, request.chunk_rows or 65536)
        dim = self._shard.tables[request.table].dim
        first = True
        for c in chunks:
            yield table_wire.chunk_message(request.table, dim, updates if first else 0, c, first)
            first = False
        if first:  # an empty table: one message with the spec
            yield table_wire.chunk_message(request.table, dim, updates, None, True)

    @_rpc
    def RestoreTable(self, request_iterator, context):
        """Stages one table's rows for the next Restore."""
        name, dim, updates = table_wire.read_table_stream(request_iterator, self._shard.tables, self._stage)
        return ps_pb2.RestoreReply(version=self._shard.version)

    def _stage(self, name: str, dim: int, updates: int, chunks) -> None:
        self._shard.table_service.stage(name, dim, updates, chunks)

    @_rpc
    def Stats(self, request, context):
        """The shard's counters: staleness per worker and histogram, applied/dropped/rejected."""
        stats = self._shard.stats(hot_ids=bool(getattr(request, "hot_ids", False)))  # (tests pass None)
        workers = [ps_pb2.WorkerStats(**w) for w in stats.pop("workers")]
        stats["tables"] = [ps_pb2.TableStats(**{**t, "staleness": [ps_pb2.FrequencyBucket(**b) for b in t["staleness"]]})
                           for t in stats["tables"]]
        if self.shm is not None:
            stats.update(self.shm.stats())
        return ps_pb2.StatsReply(workers=workers, grpc_pushes=self.grpc_pushes, **stats)

    @_rpc
    def Stop(self, request, context):
        """Asks the server process to shut down (after this reply)."""
        if self._on_stop is not None:
            self._on_stop(request.grace)
        return ps_pb2.StopReply()
