"""The client's shared-memory transport: per shard the handshake, the segment, the control channel.

`open_peer` runs the handshake of common/shm.py over gRPC (ShmOpen twice) and, when the shard
offers one, connects the control socket (common/shm_control.py); the `ShmPeer` it returns writes
a push's gradients into the segment, sends the control message (over the socket, or the
ShmPushPull method when there is none) and copies the pulled values out. `ShmLinks` holds a
client's peers, one per shard, and decides per call whether it takes shared memory or plain
gRPC (cluster.transport; PSClient in common/ps_client.py hands it every worker call).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from asyncps import shm
from asyncps.errors import UserError
from asyncps.protos import codec, ps_pb2
from asyncps.shm_control import ControlClient

logger = logging.getLogger(__name__)


AT_LAYOUT = "at layout"  # ShmPeer.write_push: the gradients are at the segment's fixed layout


class ShmPeer:
    """A confirmed segment with one shard: the layout, the control channel, and a lock held from
    writing a push until its pulled values are read (one call per segment at a time).

    The shard fixes, at the handshake, where a push of every trainable variable puts each
    gradient and where a pull of every variable finds each value (ShmOpenReply.push_layout,
    pull_layout). The worker's steps are such pushes and pulls: they travel `at_layout`, with no
    tensor described or checked per step on either side, and `push_at` / `pull_at` are those
    places as arrays (gradients computed into push_at are pushed without a copy). Other calls
    (a subset of variables, compressed or sparse gradients) describe their tensors."""

    def __init__(self, segment: shm.Segment, offer: ps_pb2.ShmOpenReply, worker: int,
                 control: ControlClient | None = None):
        self.segment, self.generation, self.worker = segment, offer.generation, worker
        self.push = (offer.push_offset, offer.push_offset + offer.push_bytes)
        self.pull = (offer.pull_offset, offer.pull_offset + offer.pull_bytes)
        self.push_at = _places(segment, offer.push_layout, self.push, "gradient", writable=True)
        self.pull_at = _places(segment, offer.pull_layout, self.pull, "pulled")
        self.control = control  # None: control messages over gRPC (ShmPushPull)
        self.lock = threading.Lock()
        self.closed = False

    def at_layout(self, part) -> bool:
        """True when `part` is a push of every trainable variable with the layout's dtypes and
        shapes, none of it lying elsewhere in the segment; its gradients are written to their
        places then (those computed there already are not copied)."""
        places = self.push_at
        if not places or part.keys() != places.keys():
            return False
        for name, value in part.items():
            place = places[name]
            if value is not place and (type(value) is not np.ndarray or value.dtype != place.dtype
                                       or value.shape != place.shape
                                       or (value.base is not None and self.segment.holds(value))):
                return False
        for name, value in part.items():
            if value is not places[name]:
                np.copyto(places[name], value, casting="no")
        return True

    def write_push(self, part) -> list[ps_pb2.ShmTensor] | str | None:
        """Writes gradients into the push region: AT_LAYOUT (every trainable variable dense, at
        its place), their ShmTensors, or None (more than fits, or a segment dropped meanwhile:
        such a push goes over gRPC).

        Sparse rows (an embedding's gradient) put their values in the region and their row
        indices in the ShmTensor (`rows`, as Tensor.rows on the wire): the indices are a few
        KiB and travel in the control message, which the shard has parsed into memory of its own
        before it reads them. The region, sized for every trainable variable dense, holds them
        unless a variable has more sparse rows than rows (duplicates not summed), which the shard
        would refuse on either path."""
        if self.closed:
            return None
        if self.at_layout(part):
            return AT_LAYOUT
        pieces = {name: codec.wire_pieces(value) for name, value in part.items()}
        placed = self.segment.write({name: values for name, (values, _, _) in pieces.items()}, *self.push)
        if placed is None:
            return None
        return [ps_pb2.ShmTensor(name=name, dtype=codec.dtype_name(a.dtype), shape=a.shape, offset=offset,
                                 nbytes=a.nbytes, sparse=pieces[name][2], rows=pieces[name][1])
                for name, a, offset in placed]

    def call(self, stub, request: ps_pb2.ShmRequest, timeout: float) -> ps_pb2.ShmReply:
        """One control message: over the socket, else the ShmPushPull method. Errors are
        grpc.RpcError either way (shm_control.ControlError on the socket)."""
        if self.control is not None:
            return ps_pb2.ShmReply.FromString(self.control.call(request.SerializeToString(), timeout))
        return stub.ShmPushPull(request, timeout=timeout, wait_for_ready=True)

    def send(self, request: ps_pb2.ShmRequest, timeout: float) -> None:
        """`call` in two halves, on the control socket only (see ControlClient.send)."""
        assert self.control is not None
        self.control.send(request.SerializeToString(), timeout)

    def receive(self, timeout: float) -> ps_pb2.ShmReply:
        assert self.control is not None
        return ps_pb2.ShmReply.FromString(self.control.receive(timeout))

    def read_pull(self, reply: ps_pb2.ShmReply, views: bool = False) -> dict:
        """The pulled values the shard wrote into the pull region: copies, or with `views`
        read-only views of the region (see ShmLinks.views)."""
        if reply.at_layout:
            return dict(self.pull_at) if views else {name: view.copy() for name, view in self.pull_at.items()}
        tensors, (lo, hi) = reply.tensors, self.pull
        read = self.segment.checked_view if views else self.segment.copy_out
        return {t.name: read(codec.dtype_of(t.dtype), tuple(t.shape), t.offset, t.nbytes, lo, hi, f"pulled {t.name!r}")
                for t in tensors}

    def interrupt(self) -> None:
        """Ends a control call in flight (the client is closing); it raises UNAVAILABLE."""
        if self.control is not None:
            self.control.interrupt()

    def close(self) -> None:
        self.closed = True
        if self.control is not None:
            self.control.close()
        self.push_at, self.pull_at = {}, {}  # (the segment unmaps once no array of it is left)
        self.segment.close()


def _places(segment: shm.Segment, layout, region: tuple[int, int], what: str, writable: bool = False) -> dict:
    """{name: array} at the places a layout names, each checked to lie in `region`; the pulled
    ones read-only (ShmError or ValueError when the shard's layout is out of bounds)."""
    return {t.name: segment.checked_view(codec.dtype_of(t.dtype), tuple(t.shape), t.offset, t.nbytes, *region,
                                         f"{what} {t.name!r}", writable=writable) for t in layout}


def open_peer(call: Callable, stub, worker: int, token: str | None, timeout: float,
              on_control_error: Callable[[str], None] | None = None) -> ShmPeer:
    """The handshake with one shard (`call(method, request)` makes a gRPC call with the client's
    deadline). Raises grpc.RpcError (the shard's answer), shm.ShmError or ValueError (the segment);
    a control socket that cannot be connected is not an error: `on_control_error(why)` hears of it
    and the peer sends its control messages over gRPC."""
    offer = call(stub.ShmOpen, ps_pb2.ShmOpenRequest(worker=worker))
    segment = shm.Segment.attach(offer.name, offer.size)
    try:
        proof = shm.proof(segment.nonce(), token)
        confirmed = call(stub.ShmOpen, ps_pb2.ShmOpenRequest(worker=worker, proof=proof, generation=offer.generation))
        control = None
        if confirmed.control:
            try:
                control = ControlClient(confirmed.control, proof, timeout)
            except OSError as err:  # another network namespace, say: the segment still serves
                if on_control_error is not None:
                    on_control_error(str(err) or type(err).__name__)
        return ShmPeer(segment, offer, worker, control)
    except BaseException:
        segment.close()
        raise


# ShmOpen answers after which `auto` uses gRPC (the shard cannot or will not share memory);
# other errors (a shard restarting, not initialized yet) propagate like any call's
_SHM_REFUSALS = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)


class ShmUnavailable(UserError):
    """cluster.transport shm, and a shard's shared-memory handshake failed (the message says why)."""


def write_push(peer: ShmPeer | None, part) -> list | str | None:
    """Writes `part` into `peer`'s push region and returns AT_LAYOUT or its ShmTensors
    (ShmPeer.write_push) with peer.lock held (the call releases it); None (lock free) when the
    push goes over gRPC."""
    if peer is None:
        return None
    peer.lock.acquire()
    try:
        tensors = peer.write_push(part)
    except BaseException:
        peer.lock.release()
        raise
    if tensors is None:
        peer.lock.release()
    return tensors


class ShmLinks:
    """A client's shared-memory links, one per shard: None (not opened yet), False (gRPC from now
    on) or a ShmPeer. Only the calls of the worker the client registered take them."""

    def __init__(self, addresses: list[str], transport: str, token: str | None, timeout: float, call: Callable):
        self.addresses, self.transport, self.timeout = addresses, transport, timeout
        self._token, self._call = token, call  # call(method, request): a gRPC call with the deadline
        self.worker: int | None = None  # the worker the client registered
        self.peers: list = [False if transport == "grpc" else None] * len(addresses)
        self._said = False  # a fallback to gRPC is logged once
        self._control_said = False  # and so is a control socket that could not be connected
        # views: pulled values are read-only views of the segment instead of copies. They stay as
        # pulled until this client's next call to that shard (only that call writes the region),
        # so a loop that is done with its weights before it calls again saves a copy of the model
        # per step (PSClient.pulled_views). False: copies, which any caller may keep.
        self.views = False

    def registered(self, worker: int) -> None:
        """The client (re)registered `worker`: segments open again on first use."""
        if self.transport == "grpc":
            return
        self.worker = worker
        for i, peer in enumerate(self.peers):
            if isinstance(peer, ShmPeer):
                self.peers[i] = None
                peer.close()

    def peer(self, i: int, stub, worker: int | None) -> ShmPeer | None:
        """The segment for a worker call to shard `i` (opened now if needed), or None: gRPC."""
        peer = self.peers[i]
        if peer is False or worker is None or worker != self.worker:
            return None
        if peer is None:
            peer = self.peers[i] = self._open(i, stub, worker)
        return peer or None

    def _open(self, i: int, stub, worker: int) -> ShmPeer | bool:
        """The handshake with shard `i`: a ShmPeer, or False (gRPC from now on)."""
        try:
            return open_peer(self._call, stub, worker, self._token, self.timeout, self._control_refused)
        except grpc.RpcError as err:
            if err.code() not in _SHM_REFUSALS:
                raise  # a shard restarting or not initialized yet: the caller's usual error
            why = f"{err.code().name}: {err.details()}"
        except (shm.ShmError, ValueError) as err:
            why = str(err)
        message = f"shard {i} ({self.addresses[i]}): no shared memory ({why})"
        if self.transport == "shm":
            raise ShmUnavailable(f"cluster.transport shm: {message}")
        if not self._said:
            self._said = True
            logger.warning(f"{message}; using gRPC (cluster.transport auto)")
        return False

    def _control_refused(self, why: str) -> None:
        if not self._control_said:
            self._control_said = True
            logger.warning(f"shared-memory control socket unavailable ({why}); control messages go over gRPC")

    def drop(self, i: int, peer: ShmPeer) -> None:
        """After a failed shared-memory call: the next call opens a new segment."""
        if self.peers[i] is peer:
            self.peers[i] = None
        peer.close()

    def call(self, i: int, stub, peer: ShmPeer, request: ps_pb2.ShmRequest, locked: bool = False):
        """(header, values) of one ShmPushPull; `locked`: the caller holds peer.lock (released here).
        None (not locked only) when the segment was dropped meanwhile."""
        if not locked:
            peer.lock.acquire()
            if peer.closed:  # dropped by another thread's failed call: this one goes over gRPC
                peer.lock.release()
                return None
        try:
            reply = peer.call(stub, request, self.timeout)
            return reply.header, peer.read_pull(reply, self.views)
        except grpc.RpcError:
            self.drop(i, peer)
            raise
        finally:
            peer.lock.release()

    def scatter_gather(self, calls: list[tuple[ShmPeer, ps_pb2.ShmRequest]]) -> list[tuple]:
        """(header, values) per shard for calls whose peers all have a control socket, their
        locks held (released here): every request is sent first, then every answer read, all in
        this thread. With several shards that saves a thread hand-off per shard (PSClient's
        `_each`; measured in docs/performance.md). A failed call drops its segment, as in
        `call`; the first error is raised after every lock is released."""
        deadline = time.monotonic() + self.timeout
        out: list = [None] * len(calls)
        error: BaseException | None = None
        sent = []
        for i, (peer, request) in enumerate(calls):
            try:
                peer.send(request, self.timeout)
                sent.append(i)
            except BaseException as err:
                error = error or err
                self._finish(i, peer, err)
        for i in sent:
            peer = calls[i][0]
            try:
                reply = peer.receive(deadline - time.monotonic())
                out[i] = reply.header, peer.read_pull(reply, self.views)
                self._finish(i, peer, None)
            except BaseException as err:
                error = error or err
                self._finish(i, peer, err)
        if error is not None:
            raise error
        return out

    def _finish(self, i: int, peer: ShmPeer, error: BaseException | None) -> None:
        if isinstance(error, grpc.RpcError):
            self.drop(i, peer)
        peer.lock.release()

    def shards(self) -> list[bool]:
        """Per shard: True when the client's calls to it travel through shared memory."""
        return [isinstance(p, ShmPeer) for p in self.peers]

    def interrupt(self) -> None:
        """Ends control calls in flight (the client is closing)."""
        for peer in self.peers:
            if isinstance(peer, ShmPeer):
                peer.interrupt()

    def close(self) -> None:
        peers, self.peers = self.peers, [False] * len(self.peers)
        for peer in peers:
            if isinstance(peer, ShmPeer):
                peer.close()
