"""The shard's side of the shared-memory data plane (common/shm.py; ps.proto ShmOpen, ShmPushPull).

One segment per worker (a new handshake replaces the worker's old one). The servicer maps
ShardError and CodecError to gRPC status codes, as for every other method.

Trust: a worker may write anything into its segment at any time, also while the shard reads it.
So every gradient is COPIED out of the segment first (bounds, dtype and byte count checked
against the control message, its declaration against the variables by `validate.check_declared`,
exactly as a wire tensor's), and only the private copy is validated (shape, dtype, finiteness:
`Shard.push` -> `validate.check_gradients`) and applied: what was validated is what is applied,
whatever the worker writes meanwhile. (A checksum would still need a second pass to apply from
memory the worker can change after the check; the copy costs one memcpy and rules that out.)
A push at the fixed layout (below) is copied as one block and its values checked in one pass.
Pulled values are written into the segment's pull region by the shard (under its lock, one
memcpy, as the gRPC path encodes under it) at offsets the shard chooses; the worker reads them
after the reply (copies, or views until its next call: PSClient.pulled_views).

The fixed layout: the handshake's first answer also gives, in the shard's variable order, the
place of every trainable variable's gradient in the push region and of every variable's value in
the pull region (ShmOpenReply.push_layout, pull_layout). A request `at_layout` (a worker's step:
a push of every trainable variable, a pull of every variable) names no tensors: the shard copies
each gradient from its place (still copy-then-validate; there is no declaration to check, the
shard chose the places) and writes each value to its place, through views made once per segment.
That leaves no per-tensor work in the messages on either side (docs/performance.md).

Sparse rows of a variable (an embedding's gradient, SparseRows) are a described tensor: their
values in the push region, copied out like any gradient's, their row indices in the ShmTensor
(`rows`), which the control message's parsing has already copied out of the worker's reach; the
shard's push then checks them as it checks a wire tensor's (range, shape, finiteness, duplicates
summed).

Rows of id-keyed tables (docs/sparse.md) ride in the control message, never in the segment:
pushed row gradients in ``push.table_grads``, the ids wanted in ``push.table_pull`` (or
``tables`` for a pull alone), the rows answered in ``header.tables``. They are a batch's unique
ids (tens of KiB), their count changes every step, and protobuf has already copied them out of
the worker's reach when they are validated, so the segment's copy-then-validate rule holds.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from google.protobuf.message import DecodeError

from asyncps import shm_control
from asyncps.protos import codec, ps_pb2
from asyncps.ps import table_wire, validate
from asyncps.ps.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ShardError
from asyncps.ps.servicer import push_reply
from asyncps.ps.shard import Shard
from asyncps.shm import HEADER_BYTES, Segment, ShmError, place, proof, region_bytes
from asyncps.sparse import SparseRows

logger = logging.getLogger(__name__)


class ShmUnavailable(ShardError):
    """This shard cannot create a segment (no /dev/shm, out of memory): the worker uses gRPC."""

    code = "UNIMPLEMENTED"


class PermissionDenied(ShardError):
    """A handshake whose proof does not match the segment's nonce."""

    code = "PERMISSION_DENIED"


@dataclass
class _Channel:
    worker: int
    segment: Segment
    generation: int
    nonce: bytes
    push: tuple[int, int]  # [lo, hi) of the push region
    pull: tuple[int, int]
    confirmed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    listener: socket.socket | None = None  # the control socket's name, until the worker connects
    control: socket.socket | None = None  # the worker's connected control socket
    closed: bool = False
    # the fixed layout (ShmOpenReply.push_layout, pull_layout) as views of the segment: where an
    # `at_layout` push finds each gradient, and where its pull writes each value
    push_at: dict[str, np.ndarray] = field(default_factory=dict)
    pull_at: dict[str, np.ndarray] = field(default_factory=dict)
    # the push layout as ONE block: a uint8 view of the segment from the first gradient's place
    # to the last one's end, and each gradient's (name, dtype, shape, offset in the block); an
    # `at_layout` push copies the block once and validates the copy in one pass (_read_layout)
    push_block: np.ndarray | None = None
    push_places: list[tuple[str, np.dtype, tuple[int, ...], int]] = field(default_factory=list)
    push_float32: bool = False  # every gradient is float32: the block reads as one float32 array

    def close(self) -> None:
        """Unmaps the segment and ends its control socket (its thread returns)."""
        self.closed = True
        self.push_at, self.pull_at, self.push_block = {}, {}, None  # (views held here would keep the mapping)
        for sock in (self.listener, self.control):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
                except OSError:
                    pass
        self.segment.close()


class ShmEndpoint:
    """Segments of the workers of one shard; `open` (handshake) and `push_pull`."""

    def __init__(self, shard: Shard, prefix: str, token: str | None = None):
        self._shard, self._prefix, self._token = shard, prefix, token
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._closed = False
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self._pushes = 0  # pushes answered through a segment (StatsReply.shm_pushes)

    # -- handshake -----------------------------------------------------------------------------

    def open(self, request: ps_pb2.ShmOpenRequest) -> ps_pb2.ShmOpenReply:
        self._shard.check_pusher(request.worker)
        if request.proof:
            return self._confirm(request)
        variables = self._shard.variables
        trainable = {n: v.value for n, v in variables.items() if not v.frozen}
        values = {n: v.value for n, v in variables.items()}
        push_bytes = region_bytes((a.dtype, a.shape) for a in trainable.values())
        pull_bytes = region_bytes((a.dtype, a.shape) for a in values.values())
        size = HEADER_BYTES + push_bytes + pull_bytes
        try:
            segment, nonce = Segment.create(self._prefix, size)
        except ShmError as err:
            raise ShmUnavailable(f"shard {self._shard.index}: shared memory unavailable: {err}") from None
        channel = _Channel(request.worker, segment, next(self._ids), nonce, (HEADER_BYTES, HEADER_BYTES + push_bytes),
                           (HEADER_BYTES + push_bytes, size))
        push_layout = _layout(trainable, *channel.push)
        pull_layout = _layout(values, *channel.pull)
        channel.push_at = {t.name: segment.view(trainable[t.name].dtype, trainable[t.name].shape, t.offset)
                           for t in push_layout}
        channel.pull_at = {t.name: segment.view(values[t.name].dtype, values[t.name].shape, t.offset)
                           for t in pull_layout}
        if push_layout:
            start, end = push_layout[0].offset, max(t.offset + t.nbytes for t in push_layout)
            channel.push_block = segment.view(np.dtype(np.uint8), (end - start,), start)
            channel.push_places = [(t.name, trainable[t.name].dtype, trainable[t.name].shape, t.offset - start)
                                   for t in push_layout]
            channel.push_float32 = (all(a.dtype == np.float32 for a in trainable.values())
                                    and (end - start) % 4 == 0)
        with self._lock:
            if self._closed:
                segment.close()
                raise FailedPrecondition(f"shard {self._shard.index} is stopping")
            old = self._channels.pop(request.worker, None)
            self._channels[request.worker] = channel
        if old is not None:
            old.close()
        return ps_pb2.ShmOpenReply(name=segment.name, generation=channel.generation, size=size,
                                   push_offset=channel.push[0], push_bytes=push_bytes,
                                   pull_offset=channel.pull[0], pull_bytes=pull_bytes,
                                   push_layout=push_layout, pull_layout=pull_layout)

    def _confirm(self, request: ps_pb2.ShmOpenRequest) -> ps_pb2.ShmOpenReply:
        with self._lock:
            channel = self._channels.get(request.worker)
            if channel is None or channel.generation != request.generation or channel.confirmed:
                raise FailedPrecondition(f"shard {self._shard.index}: no pending shared-memory handshake of worker "
                                         f"{request.worker} with generation {request.generation}")
            if not secrets.compare_digest(bytes(request.proof), proof(channel.nonce, self._token)):
                del self._channels[request.worker]
                channel.close()
                raise PermissionDenied(f"shard {self._shard.index}: worker {request.worker}'s shared-memory proof "
                                       "does not match the segment's nonce (another host, or another job)")
            channel.confirmed = True
            channel.segment.unlink()  # both sides keep the mapping; nothing stays in /dev/shm
            held = len(self._channels), sum(c.segment.size for c in self._channels.values())
        control = self._listen(channel)
        logger.info(f"ps {self._shard.index}: worker {request.worker} on shared memory "
                    f"({_size(channel.segment.size)} segment; {held[0]} held, {_size(held[1])} in all; control "
                    f"{'on a Unix socket' if control else 'over gRPC'})")
        return ps_pb2.ShmOpenReply(generation=channel.generation, size=channel.segment.size, control=control)

    # -- control socket (common/shm_control.py) -------------------------------------------------

    def _listen(self, channel: _Channel) -> str:
        """Opens the channel's control socket and its thread; the name, or "" (control over gRPC)."""
        if not shm_control.available():
            return ""
        name = f"asyncps-ps{self._shard.index}-{secrets.token_hex(16)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(shm_control.address(name))
            listener.listen(4)
        except OSError as err:
            listener.close()
            logger.info(f"ps {self._shard.index}: no control socket for worker {channel.worker} ({err}); "
                        "its control messages go over gRPC")
            return ""
        channel.listener = listener
        threading.Thread(target=self._serve_control, args=(channel, listener), daemon=True,
                         name=f"ps{self._shard.index}-shm-control-w{channel.worker}").start()
        return name

    def _serve_control(self, channel: _Channel, listener: socket.socket) -> None:
        """Answers the channel's control messages until the worker or the channel closes it."""
        try:
            conn = self._accept(channel, listener)
        finally:
            channel.listener = None
            listener.close()
        if conn is None:
            return
        with conn:
            while not channel.closed:
                try:
                    kind, body = shm_control.recv_frame(conn)
                except OSError:
                    return  # the worker closed it, or the channel was dropped (close shuts it down)
                if kind != shm_control.CALL or len(body) < shm_control.DEADLINE.size:
                    logger.warning(f"ps {self._shard.index}: worker {channel.worker} sent a malformed control "
                                   "frame; closing its control socket")
                    return
                try:
                    shm_control.send_frame(conn, *self._answer(body))
                except OSError:
                    return

    def _answer(self, body: bytes) -> tuple[int, bytes]:
        """(status, body) for one CALL frame: the ShmReply, or the error the servicer would give."""
        deadline = time.monotonic() + shm_control.DEADLINE.unpack_from(body)[0]
        try:
            request = ps_pb2.ShmRequest.FromString(body[shm_control.DEADLINE.size:])
            reply = self.push_pull(request, lambda: deadline - time.monotonic())
            return shm_control.OK, reply.SerializeToString()
        except ShardError as err:
            return shm_control.ERROR, shm_control.error_body(err.code, str(err))
        except (codec.CodecError, DecodeError) as err:
            return shm_control.ERROR, shm_control.error_body("INVALID_ARGUMENT", str(err))
        except Exception as err:  # as gRPC answers a handler's unexpected exception: INTERNAL
            logger.exception(f"ps {self._shard.index}: control call failed")
            return shm_control.ERROR, shm_control.error_body("INTERNAL", f"{type(err).__name__}: {err}")

    def _accept(self, channel: _Channel, listener: socket.socket) -> socket.socket | None:
        """The worker's connection: same uid, and the handshake's proof as its first frame.
        Others are closed; None when ACCEPT_SECONDS pass first or the channel closes."""
        expected = proof(channel.nonce, self._token)
        end = time.monotonic() + shm_control.ACCEPT_SECONDS
        while not channel.closed and (left := end - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except OSError:
                return None  # the time is up, or the channel closed the listener
            try:
                conn.settimeout(shm_control.HELLO_SECONDS)
                if not shm_control.same_uid(conn):
                    raise ConnectionError("a process of another uid")
                kind, body = shm_control.recv_frame(conn)
                if kind != shm_control.HELLO or not secrets.compare_digest(body, expected):
                    raise ConnectionError("no valid proof")
                conn.settimeout(None)
                channel.control = conn
                if channel.closed:  # closed meanwhile: close() did not see this connection
                    raise ConnectionError("the segment was dropped")
                shm_control.send_frame(conn, shm_control.OK)
                return conn
            except OSError as err:
                logger.warning(f"ps {self._shard.index}: refused a connection to worker {channel.worker}'s "
                               f"control socket ({err})")
                conn.close()
        return None

    # -- data ----------------------------------------------------------------------------------

    def push_pull(self, request: ps_pb2.ShmRequest, remaining) -> ps_pb2.ShmReply:
        """Runs the request (from the ShmPushPull method or the control socket); `remaining()`
        the call's seconds left."""
        pushing = request.HasField("push")
        worker = request.push.worker if pushing else request.worker
        channel = self._channel(worker, request.generation)
        if not channel.lock.acquire(timeout=max(0.0, remaining() or 0.0)):
            raise DeadlineExceeded(f"worker {worker}: its shared-memory segment is busy with another call")
        try:
            reply = ps_pb2.ShmReply()
            if request.at_layout and (len(request.tensors) or len(request.names)):
                raise InvalidArgument(f"worker {worker}: a request at the segment's layout names no tensors")
            if pushing:
                header = request.push
                self._shard.check_pusher(worker)
                checked = False
                if request.at_layout:
                    grads, checked = self._read_layout(channel, header.table_grads)
                else:
                    grads = self._read_push(channel, request.tensors, header.table_grads)
                result = self._shard.push(worker, header.seq, header.read_version, grads, remaining(), checked=checked)
                del grads
                with self._lock:
                    self._pushes += 1
                reply.header.push.CopyFrom(push_reply(result))
            if request.pull:
                age = request.push.pull_age if pushing else request.age
                wanted = request.push.table_pull if pushing else request.tables
                tables = table_wire.requested_ids(wanted, self._shard.tables) if len(wanted) else None
                export = self._export_layout(channel, reply) if request.at_layout else self._export(channel, reply)
                version = self._shard.pull(worker, request.names, remaining(), export, age=age, tables=tables)
                reply.header.version = version
            elif pushing:
                reply.header.version = reply.header.push.version
            return reply
        finally:
            channel.lock.release()

    def _channel(self, worker: int, generation: int) -> _Channel:
        with self._lock:
            channel = self._channels.get(worker)
        if channel is None or channel.generation != generation or not channel.confirmed:
            raise FailedPrecondition(f"shard {self._shard.index}: worker {worker} has no shared-memory segment of "
                                     f"generation {generation} (shard restarted? open it again)")
        return channel

    def _read_push(self, channel: _Channel, tensors, table_grads=()) -> dict:
        """Private copies of the pushed gradients (see the module docstring); a bad declaration is
        refused before anything is copied and counted against the worker."""
        variables = self._shard.variables
        lo, hi = channel.push
        grads: dict[str, np.ndarray | SparseRows | table_wire.TableGrad] = {}  # gradients, then the tables' rows
        try:
            for t in tensors:
                if t.name in grads:
                    raise InvalidArgument(f"variable {t.name!r} appears twice in one push")
                dtype, shape = codec.dtype_of(t.dtype), tuple(t.shape)
                validate.check_declared(t.name, "", dtype, shape, t.sparse, variables)
                rows = codec.row_indices(t, shape)  # None if dense; parsed from the message: the shard's own
                try:
                    values = channel.segment.copy_out(dtype, shape, t.offset, t.nbytes, lo, hi, f"variable {t.name!r}")
                except ShmError as err:
                    raise InvalidArgument(str(err)) from None
                grads[t.name] = values if rows is None else SparseRows(rows, values)
            if len(table_grads):
                grads.update(table_wire.pushed_rows(table_grads, self._shard.tables))
        except (ShardError, codec.CodecError):
            self._shard.count_rejected(channel.worker)
            raise
        return grads

    def _read_layout(self, channel: _Channel, table_grads=()) -> tuple[dict, bool]:
        """`_read_push` for a push at the segment's layout: a private copy of every gradient
        (the shard chose where each lies, so there is no declaration to check), and whether the
        dense ones are already validated.

        The copy is one memcpy of the whole push block (gaps between places included), and the
        gradients are views of it. Their names, dtypes and shapes are the shard's own variables'
        by construction, so all that is left to check is their values: for float32 gradients
        one finiteness check of the whole copy (validate.all_finite) proves them all finite, and
        the shard skips its per-tensor checks (Shard.push `checked`), about 3 us a tensor. When
        that check fails (a NaN, or garbage in a gap) or the dtypes differ, nothing is decided
        here: the shard validates tensor by tensor, as for any push, and names the bad one."""
        grads: dict[str, np.ndarray | table_wire.TableGrad] = {}
        checked = False
        if channel.push_block is not None:
            private = channel.push_block.copy()  # what is validated is what is applied
            grads = {name: np.ndarray(shape, dtype, buffer=private, offset=offset)
                     for name, dtype, shape, offset in channel.push_places}
            checked = channel.push_float32 and validate.all_finite(private.view(np.float32))
        if len(table_grads):
            try:
                grads.update(table_wire.pushed_rows(table_grads, self._shard.tables))
            except (ShardError, codec.CodecError):
                self._shard.count_rejected(channel.worker)
                raise
        return grads, checked

    def _export_layout(self, channel: _Channel, reply: ps_pb2.ShmReply):
        """`_export` for a pull at the segment's layout: every value at its place."""
        reply.at_layout = True

        def export(version, values, rows=None):
            reply.header.tables.extend(table_wire.answer(rows))
            places = channel.pull_at
            if values.keys() != places.keys():  # a pull of every variable fills the layout: always
                raise FailedPrecondition(f"shard {self._shard.index}: pulled values do not match worker "
                                         f"{channel.worker}'s segment layout; open it again")
            for name, value in values.items():
                np.copyto(places[name], value, casting="no")
            return version

        return export

    def _export(self, channel: _Channel, reply: ps_pb2.ShmReply):
        """Writes pulled values into the pull region (run under the shard's lock); the version."""

        def export(version, values, rows=None):
            reply.header.tables.extend(table_wire.answer(rows))
            lo, hi = channel.pull
            wire = {name: codec.wire_array(value) for name, value in values.items()}
            placed = channel.segment.write(wire, lo, hi)
            if placed is None:  # the region holds every variable: never, unless the specs changed
                raise FailedPrecondition(f"shard {self._shard.index}: pulled values do not fit worker "
                                         f"{channel.worker}'s segment; open it again")
            for name, array, offset in placed:
                reply.tensors.add(name=name, dtype=codec.dtype_name(array.dtype), shape=array.shape, offset=offset,
                                  nbytes=array.nbytes)
            return version

        return export

    # -- bookkeeping ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """{"shm_segments", "shm_bytes", "shm_pushes"}: segments held, their bytes, and the
        pushes answered through them."""
        with self._lock:
            return {"shm_segments": len(self._channels), "shm_bytes": sum(c.segment.size for c in self._channels.values()),
                    "shm_pushes": self._pushes}

    def close(self) -> None:
        """Unlinks and unmaps every segment (the shard stops); later handshakes are refused."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _layout(arrays: dict[str, np.ndarray], lo: int, hi: int) -> list[ps_pb2.ShmTensor]:
    """ShmTensors placing `arrays` (their dtype and shape) one after another in [lo, hi) as
    Segment.write would (the region was sized for them)."""
    offsets = place(((name, a.nbytes) for name, a in arrays.items()), lo, hi)
    assert offsets is not None, "the region is sized for these arrays"
    return [ps_pb2.ShmTensor(name=name, dtype=codec.dtype_name(a.dtype), shape=a.shape, offset=offsets[name],
                             nbytes=a.nbytes) for name, a in arrays.items()]


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
