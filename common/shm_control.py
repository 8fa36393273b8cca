"""The control channel of the shared-memory data plane: ShmPushPull's messages over a Unix socket.

Why: once a step's tensors travel through the segment (common/shm.py), what is left per step
and shard is a control message of about a hundred bytes each way (ps.proto ShmRequest and
ShmReply). As a gRPC call from Python that message costs more CPU than the memcpys of the MLP's
megabyte (a unary call: a completion-queue thread hand-off on each side, HTTP/2 framing; see
docs/performance.md section 3), and the issue's target of a cluster step at <= 1.5x the CPU of
a step in one process is bounded by it. Over a connected Unix socket the same protobuf bytes cost
one send and one receive per side, in the threads that already wait for them.

Same messages, same handler, same errors: the shard runs `ShmEndpoint.push_pull` for each
request exactly as for the gRPC method, and answers an error with the status code name the
servicer would have given; the client raises it as a `ControlError`, which is a
``grpc.RpcError`` with ``code()`` and ``details()``, so every caller's recovery (the worker's
rejoin on `RETRIED_CODES`, the dropped segment) is the one of the gRPC path.

Who may talk on it (docs/security.md): the shard listens, per confirmed segment, on a name in
Linux's abstract socket namespace (a leading NUL byte: no file anywhere, so nothing to remove
after a SIGKILL) of 128 random bits, answered only in the handshake's confirmed step; it accepts
one connection that (a) comes from a process of the shard's own uid (SO_PEERCRED) and (b) sends
first the handshake's proof again (the segment's nonce, or its HMAC with the job token, which only
a reader of the 0600 segment can know). Anything else is closed and the name stays open until
the worker's connection arrives or ACCEPT_SECONDS pass. A worker that cannot connect (another
network namespace, as in a compose run whose containers share only /dev/shm; a kernel without
abstract sockets) keeps the segment and sends its control messages over gRPC (ShmPushPull).

Frames: a 5-byte header (little-endian uint32 body length, one byte kind or status) then the
body. Client -> shard: HELLO (body: the proof), CALL (body: float64 seconds left of the call's
deadline, then ShmRequest bytes). Shard -> client: OK (body: ShmReply bytes, empty for HELLO)
or ERROR (body: the status code name, a NUL, the message in UTF-8). Bodies are bounded by
MAX_BODY_BYTES (rows of id-keyed tables ride in these messages: a batch's unique ids, KiBs).
"""
from __future__ import annotations

import os
import socket
import struct

import grpc

from asyncps.protos.rpc import StatusError

HEADER = struct.Struct("<IB")
DEADLINE = struct.Struct("<d")
HELLO, CALL = 1, 2  # client -> shard
OK, ERROR = 0, 1  # shard -> client
MAX_BODY_BYTES = 64 << 20  # bounds what one frame makes the reader allocate
ACCEPT_SECONDS = 30.0  # the worker connects right after the handshake's answer
HELLO_SECONDS = 5.0  # an accepted connection must prove itself this fast
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(StatusError):
    """A control call's failure, shaped like the gRPC error the same call would raise."""


class FrameError(ConnectionError):
    """The peer closed the socket, or sent a frame that breaks the format."""


def available() -> bool:
    """True where Unix sockets exist (Linux: the abstract namespace this module uses)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")


def address(name: str) -> str:
    """The abstract-namespace address of `name` (no file is created)."""
    return "\0" + name


def send_frame(sock: socket.socket, kind: int, *parts: bytes) -> None:
    body = b"".join(parts)
    sock.sendall(HEADER.pack(len(body), kind) + body)


def recv_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(kind or status, body); FrameError when the peer closed or the length is out of bounds."""
    length, kind = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if length > MAX_BODY_BYTES:
        raise FrameError(f"a control frame of {length} bytes (at most {MAX_BODY_BYTES})")
    return kind, _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise FrameError("the peer closed the control socket")
        got += k
    return bytes(buf)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def same_uid(sock: socket.socket) -> bool:
    return peer_uid(sock) == os.getuid()


def error_body(code_name: str, message: str) -> bytes:
    return code_name.encode() + b"\0" + message.encode("utf-8", "replace")


def _failed(err: OSError, timeout: float) -> ControlError:
    if isinstance(err, socket.timeout):
        return ControlError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no answer on the shared-memory control socket within {timeout:g} s")
    # FrameError included: the shard stopped, or dropped the segment
    return ControlError(grpc.StatusCode.UNAVAILABLE, f"shared-memory control socket: {err}")


class ControlClient:
    """The worker's end: connects, proves itself, then one call at a time (`call`).

    Not thread-safe by itself: the segment's lock (one call per segment at a time) serializes it.
    """

    def __init__(self, name: str, proof: bytes, timeout: float):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(address(name))
            if not same_uid(self._sock):
                raise ConnectionError("the control socket belongs to another user")
            send_frame(self._sock, HELLO, proof)
            status, body = recv_frame(self._sock)
            if status != OK:
                raise ConnectionError(f"the shard refused the control socket: {body.decode(errors='replace')}")
        except BaseException:
            self._sock.close()
            raise

    def call(self, request: bytes, timeout: float) -> bytes:
        """The reply's bytes for one request's bytes, or ControlError (DEADLINE_EXCEEDED after
        `timeout` s, UNAVAILABLE when the shard closed the socket, else the shard's code)."""
        self.send(request, timeout)
        return self.receive(timeout)

    def send(self, request: bytes, timeout: float) -> None:
        """The first half of `call`: a client talking to several shards sends to all of them
        first, then reads every answer (`receive`), with no thread per shard."""
        try:
            self._sock.settimeout(timeout)
            send_frame(self._sock, CALL, DEADLINE.pack(timeout), request)
        except OSError as err:
            raise _failed(err, timeout) from None

    def receive(self, timeout: float) -> bytes:
        """The answer to the request `send` sent (see `call`)."""
        try:
            self._sock.settimeout(max(timeout, 1e-3))
            status, body = recv_frame(self._sock)
        except OSError as err:
            raise _failed(err, timeout) from None
        if status == OK:
            return body
        code_name, _, message = body.partition(b"\0")
        code = grpc.StatusCode.__members__.get(code_name.decode(errors="replace"), grpc.StatusCode.UNKNOWN)
        raise ControlError(code, message.decode("utf-8", "replace"))

    def interrupt(self) -> None:
        """Ends a call in flight from another thread (it raises UNAVAILABLE)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.interrupt()
        self._sock.close()
