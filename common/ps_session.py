"""A worker's session with one shard on the gRPC path: a PushPullSession stream held open.

Why: a unary call pays gRPC's per-call setup (call object, metadata, status, the server's
interceptors) on every step. A message each way on a stream that stays open costs half as much
(bench/grpc_floor.py: 64 bytes, 0.61 ms as a unary call, 0.30 ms on an open stream).
`bench/pushpull.py --transport grpc`, before -> with sessions: the worker's push-pull of six
8-float tensors (`--tiny`) 1.13-1.18 -> 0.81-0.90 ms a round trip; the MNIST MLP's 1.08 MB
2.63-2.67 -> 2.37-2.45 ms (docs/performance.md, seventh pass).

What it sends is exactly PushPullOne's request and what it gets back is PushPullOne's reply, one
message each, in order (protos/ps.proto). The session is an optimization that never changes
an outcome:
- It is opened on first use, and opened again before a call when it has ended, has idled for
  half the shard's idle limit (`STREAM_IDLE_TIMEOUT`), or is within one rpc_timeout of its own
  deadline. So the shard's stream guard does not end a session in use.
- If the session ends before it answers (the shard restarted or is stopping: UNAVAILABLE,
  CANCELLED; the shard's stream limits are full: RESOURCE_EXHAUSTED; a clean end), the same
  request goes again as PushPullOne, and so do the calls of the next RETRY_AFTER_S seconds.
  Pushes are idempotent per (worker, seq): one that reached the shard is answered DUPLICATE,
  and the pull still comes back. PushPullOne waits for a restarting shard as every unary call
  does.
- A status the shard gave the push (INVALID_ARGUMENT, FAILED_PRECONDITION, DEADLINE_EXCEEDED
  after waiting its header's `wait_s`, ...) is raised as it is: the RpcError a PushPullOne would
  have raised. The session is dropped, and the next call opens a new one.
- If no answer comes within rpc_timeout (+ ANSWER_SLACK_S, for the shard's own answer to a wait
  that timed out to arrive first), the session is cancelled and DEADLINE_EXCEEDED raised, as a
  unary call's deadline would.
- One call at a time: a second caller while one is in flight (a background push-pull beside
  the worker's own) takes PushPullOne.
- The shard ends a session cleanly (no error) when it idled past the shard's limit or the shard
  is stopping: a request caught in that end goes as PushPullOne, and the next call opens a new
  session. A shard from before sessions (UNIMPLEMENTED) gets PushPullOne from then on.
- Retries: the channel's retry policy (common/ps_client.py) leaves the session out; its
  fallback, PushPullOne, is retried as every call is.

A daemon thread per open session reads the replies, so a call can wait with a timeout. Against
reading in the caller it cost 7-32 us a round trip (a throwaway comparison, not kept as a bench).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc

from asyncps.protos.rpc import StatusError
from asyncps.protos.serving import STREAM_IDLE_TIMEOUT

logger = logging.getLogger(__name__)

# A session that ends with one of these before it answers hands its request to PushPullOne.
FALLBACK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED})
IDLE_REOPEN_S = STREAM_IDLE_TIMEOUT / 2  # reopen a session idle this long (the shard ends it at the full limit)
# A call waits this much longer than the push's wait_s (rpc_timeout), so that a shard that gave up
# waiting answers first with its own DEADLINE_EXCEEDED, which names what it waited for.
ANSWER_SLACK_S = 1.0
LIFETIMES = 4  # a session's deadline in rpc_timeouts (as the shard's cap on a stream without one)
# After a session ended before answering (refused by the shard's stream limits, the shard gone),
# calls go as PushPullOne this long before a session is tried again: an over-subscribed shard
# must not pay a refused stream on top of every call.
RETRY_AFTER_S = 5.0


class SessionTimeout(StatusError):
    """No answer on a session within the client's deadline: what a unary call's deadline raises."""

    def __init__(self, seconds: float):
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from the shard's session within {seconds:g} s")


class _Stream:
    """One open PushPullSession call and the thread that reads its replies."""

    def __init__(self, method, lifetime: float):
        self.used = time.monotonic()
        self.deadline = self.used + lifetime
        self.ended = threading.Event()  # the reader saw the stream end (an error or a clean end)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._call = method(iter(self._requests.get, None), timeout=lifetime, wait_for_ready=True)
        threading.Thread(target=self._read, name="ps-session", daemon=True).start()

    def _read(self) -> None:
        end: object = None  # a clean end
        try:
            for reply in self._call:
                self._replies.put(reply)
        except Exception as err:  # an RpcError; anything else must not leave a caller waiting either
            end = err
        self.ended.set()
        self._replies.put(end)

    def exchange(self, request: bytes, timeout: float) -> bytes | grpc.RpcError | BaseException | None:
        """Sends one request; its reply (bytes), or how the stream ended (an error, None)."""
        self._requests.put(request)
        try:
            item = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise SessionTimeout(timeout) from None
        self.used = time.monotonic()
        return item

    def close(self) -> None:
        self._requests.put(None)  # ends the request stream: the shard's handler returns
        self._call.cancel()


class Session:
    """PushPullOne requests to one shard, over a stream held open (module docstring)."""

    def __init__(self, method, fallback: Callable[[bytes], bytes], rpc_timeout: float, name: str = "shard"):
        self.name = name  # for the log
        self._method = method  # the stub's PushPullSession
        self._fallback = fallback  # request -> reply as PushPullOne
        self._timeout = rpc_timeout
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False
        self._retry_at = 0.0  # monotonic time before which calls go as PushPullOne
        self.opened = 0  # streams opened so far (tests, logs)
        self.fallbacks = 0  # requests that went as PushPullOne because a session could not answer

    def call(self, request: bytes) -> bytes:
        """The reply to one PushPullOne request."""
        if not self._lock.acquire(blocking=False):
            return self._fallback(request)  # another call of this client holds the session
        try:
            if self._closed:
                return self._fallback(request)
            if time.monotonic() < self._retry_at:
                self.fallbacks += 1
                return self._fallback(request)
            stream = self._fresh()
            reply = stream.exchange(request, self._timeout + ANSWER_SLACK_S)
            if isinstance(reply, bytes):
                return reply
            self._drop()
            if self._closed and isinstance(reply, BaseException):
                raise reply  # closed under this call: it ends, as a unary call on a closed channel
            if isinstance(reply, grpc.RpcError) and reply.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._closed = True  # a shard from before sessions: PushPullOne from now on
                logger.info(f"{self.name} has no sessions (an older shard); its push-pulls go as PushPullOne")
                return self._fallback(request)
            if reply is None or (isinstance(reply, grpc.RpcError) and reply.code() in FALLBACK_CODES):
                self.fallbacks += 1
                self._retry_at = time.monotonic() + RETRY_AFTER_S
                how = "ended" if reply is None else reply.code().name
                logger.debug(f"session to {self.name} {how} before answering; PushPullOne for {RETRY_AFTER_S:g} s")
                return self._fallback(request)
            raise reply
        except SessionTimeout:
            self._stream = None
            raise
        finally:
            self._lock.release()

    def _fresh(self) -> _Stream:
        now = time.monotonic()
        stream = self._stream
        if stream is not None and (stream.ended.is_set() or now - stream.used > IDLE_REOPEN_S
                                   or stream.deadline - now < self._timeout + ANSWER_SLACK_S):
            self._drop()
            stream = None
        if stream is None:
            stream = self._stream = _Stream(self._method, LIFETIMES * self._timeout + ANSWER_SLACK_S)
            self.opened += 1
        return stream

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Ends the open stream at once, without waiting for a call on it: a push left waiting at
        a frozen shard ends with CANCELLED, as a unary call ends when its channel closes (the
        worker closes its client so that its process can exit). Later calls go as PushPullOne.
        Not under the lock, on purpose: a call that passed the closed check just before may
        still open a stream, which PSClient.close(), closing the channels next, cancels (or on a
        closed channel it fails as a unary call would)."""
        self._closed = True
        stream = self._stream
        if stream is not None:
            stream.close()
