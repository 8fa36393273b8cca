"""The client's shared-memory transport to one shard: the handshake, the segment, the control channel.

`open_peer` runs the handshake of common/shm.py over gRPC (ShmOpen twice) and, when the shard
offers one, connects the control socket (common/shm_control.py); the `ShmPeer` it returns writes
a push's gradients into the segment, sends the control message (over the socket, or the
ShmPushPull method when there is none) and copies the pulled values out. PSClient
(common/ps_client.py) decides per shard whether a call takes this transport or plain gRPC.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from asyncps import shm
from asyncps.protos import codec, ps_pb2
from asyncps.shm_control import ControlClient
from asyncps.sparse import SparseRows

logger = logging.getLogger(__name__)


class ShmPeer:
    """A confirmed segment with one shard: the layout, the control channel, and a lock held from
    writing a push until its pulled values are read (one call per segment at a time)."""

    def __init__(self, segment: shm.Segment, offer: ps_pb2.ShmOpenReply, worker: int,
                 control: ControlClient | None = None):
        self.segment, self.generation, self.worker = segment, offer.generation, worker
        self.push = (offer.push_offset, offer.push_offset + offer.push_bytes)
        self.pull = (offer.pull_offset, offer.pull_offset + offer.pull_bytes)
        self.control = control  # None: control messages over gRPC (ShmPushPull)
        self.lock = threading.Lock()
        self.closed = False

    def write_push(self, part) -> list[ps_pb2.ShmTensor] | None:
        """Writes dense gradients into the push region; their ShmTensors, or None (sparse rows,
        more than fits, or a segment dropped meanwhile: such a push goes over gRPC)."""
        if self.closed or any(isinstance(v, SparseRows) for v in part.values()):
            return None
        wire = {name: codec.wire_array(value) for name, value in part.items()}
        placed = self.segment.write(wire, *self.push)
        if placed is None:
            return None
        return [ps_pb2.ShmTensor(name=name, dtype=codec.dtype_name(a.dtype), shape=a.shape, offset=offset,
                                 nbytes=a.nbytes) for name, a, offset in placed]

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

    def read_pull(self, tensors) -> dict:
        """Copies of the pulled values the shard wrote into the pull region."""
        lo, hi = self.pull
        return {t.name: self.segment.copy_out(codec.dtype_of(t.dtype), tuple(t.shape), t.offset, t.nbytes, lo, hi,
                                              f"pulled {t.name!r}") for t in tensors}

    def interrupt(self) -> None:
        """Ends a control call in flight (the client is closing); it raises UNAVAILABLE."""
        if self.control is not None:
            self.control.interrupt()

    def close(self) -> None:
        self.closed = True
        if self.control is not None:
            self.control.close()
        self.segment.close()


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
