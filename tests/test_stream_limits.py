"""Denial of service and memory through request streams (issue 12, items 6 and 7), over real gRPC.

A shard server runs in this process on 127.0.0.1. Hostile clients open raw Push streams from
generators that send a header (and maybe one piece) and then block on a threading.Event, as a
caller that stops sending would. The checks:

- idle streams never take the threads of pulls and unary pushes: a normal Pull and PushOne
  succeed within their deadline while 40 idle streams are open on 20 connections; streams
  beyond the limits (in total, per connection) end at once with RESOURCE_EXHAUSTED;
- an idle stream ends with DEADLINE_EXCEEDED (naming the idle timeout) after the idle timeout
  and frees its slot; its header-only push is not applied;
- a tensor declared for a variable the shard does not hold, or larger than the variable, is
  refused before its data arrives and without allocating its declared size;
- streamed pushes in flight are capped by the shard's byte budget (RESOURCE_EXHAUSTED), and a
  cancelled stream returns its budget and its memory.

Everything waits on events or on conditions with generous deadlines (2-core machines under load):
no assertion depends on a tight timing.
"""
from __future__ import annotations

import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest

from asyncps.config import Config
from asyncps.protos import codec, ps_pb2, tensor_pb2
from asyncps.protos.rpc import ps_stub
from asyncps.protos.serving import StreamLimits
from asyncps.partition import place
from asyncps.ps.server import ShardServer
from asyncps import ps_client
from asyncps.ps_client import PSClient, channel_options

C = grpc.StatusCode
VARS = {"w": ((256, 256), np.float32), "emb": ((64, 8), np.float32)}
W_BYTES = 256 * 256 * 4
WAIT = 60.0  # seconds: an upper bound for anything that should happen "soon" on a loaded machine


def _cfg(workers: int = 1) -> Config:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, workers, 20.0
    return cfg


class Shard:
    """A real shard server in this process, initialized, worker 0 registered."""

    def __init__(self, streams: StreamLimits | None = None, push_bytes: int | None = None, vars=VARS):
        self.cfg = _cfg()
        self.server = ShardServer(self.cfg, 0, streams=streams, push_bytes=push_bytes)
        self.address = f"127.0.0.1:{self.server.start()}"
        self.client = PSClient([self.address], place({n: (s, d) for n, (s, d) in vars.items()}, 1), self.cfg)
        self.client.init({n: np.zeros(s, d) for n, (s, d) in vars.items()})
        self.client.register(0)
        self.channels: list[grpc.Channel] = []

    def stub(self, own_connection: bool = True):
        """A raw stub; with `own_connection`, on a TCP connection of its own (its own peer)."""
        options = channel_options() + ([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])
        channel = grpc.insecure_channel(self.address, options=options)
        self.channels.append(channel)
        return ps_stub(channel)

    def close(self):
        for channel in self.channels:
            channel.close()
        self.client.close()
        self.server.stop(0)


@pytest.fixture
def shards():
    made: list[Shard] = []

    def make(**kw) -> Shard:
        made.append(Shard(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _header(worker=0, seq=1, read_version=0) -> bytes:
    return next(codec.encode_wire({}, ps_pb2.PushHeader(worker=worker, seq=seq, read_version=read_version)
                                  .SerializeToString()))


def _piece_message(name, shape, data: bytes, total: int, offset=0, dtype="float32", sparse=False, rows=b"") -> bytes:
    tensor = tensor_pb2.Tensor(name=name, dtype=dtype, shape=list(shape), data=data, offset=offset, total=total,
                               sparse=sparse, rows=rows)
    return ps_pb2.PushChunk(tensors=[tensor]).SerializeToString()


class HeldStream:
    """A Push stream that sends `messages`, then blocks until `release()` (then sends `rest`)."""

    def __init__(self, stub, messages: list[bytes], rest: list[bytes] = (), timeout: float = 120.0):
        self.sent, self.go = threading.Event(), threading.Event()
        self.done = threading.Event()
        self.code = self.details = self.reply = None
        self._messages, self._rest = list(messages), list(rest)
        self.future = stub.Push.future(self._requests(), timeout=timeout)
        self.future.add_done_callback(self._finished)

    def _requests(self):
        yield from self._messages
        self.sent.set()
        self.go.wait()
        yield from self._rest

    def _finished(self, future):
        try:
            self.reply = future.result()
            self.code = C.OK
        except grpc.RpcError as err:
            self.code, self.details = err.code(), err.details()
        except grpc.FutureCancelledError:
            self.code = C.CANCELLED
        self.done.set()

    def release(self):
        self.go.set()


def _wait_until(predicate, what: str, timeout: float = WAIT):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def _release_all(streams):
    for s in streams:
        s.release()
    for s in streams:
        s.future.cancel()


# ----------------------------------------------------------------------------------------------
# Item 6: idle streams


def test_idle_streams_never_take_the_threads_of_pulls_and_unary_pushes(shards):
    # default limits (1 worker: 10 streams, 4 per connection), an idle timeout longer than the test
    shard = shards(streams=StreamLimits(max_streams=10, per_peer=4, idle_timeout=600.0, max_duration=600.0))
    held = []
    try:
        for _ in range(20):  # 20 connections x 2 streams: more than every thread the server had before
            stub = shard.stub()
            held += [HeldStream(stub, [_header()]) for _ in range(2)]
        for s in held:
            assert s.sent.wait(WAIT), "a stream could not send its header"
        # a normal client still pulls and pushes (unary) within its deadline (before: every
        # thread waited in an idle stream, and the pull ended with DEADLINE_EXCEEDED)
        params, versions = shard.client.pull(worker=0)
        shard.client.push({"w": np.ones((256, 256), np.float32)}, versions, 0, 1)
        # streams beyond the limit end at once, with a clear status, while the others stay open
        _wait_until(lambda: sum(s.done.is_set() for s in held) >= 30, "30 of 40 streams refused")
        refused = [s for s in held if s.done.is_set()]
        assert {s.code for s in refused} == {C.RESOURCE_EXHAUSTED}, {(s.code, s.details) for s in refused}
        assert "request streams open" in refused[0].details
        assert sum(not s.done.is_set() for s in held) == 10  # the admitted idle streams are still open
        params, versions = shard.client.pull(worker=0)  # (certainly while they are)
        assert versions == [1] and shard.client.stats()[0].version == 1
    finally:
        _release_all(held)


def test_streams_per_connection_are_limited(shards):
    shard = shards(streams=StreamLimits(max_streams=10, per_peer=4, idle_timeout=600.0, max_duration=600.0))
    stub = shard.stub()
    held = [HeldStream(stub, [_header()]) for _ in range(7)]
    try:
        _wait_until(lambda: sum(s.done.is_set() for s in held) >= 3, "3 of 7 streams on one connection refused")
        refused = [s for s in held if s.done.is_set()]
        assert {s.code for s in refused} == {C.RESOURCE_EXHAUSTED}
        assert "on this connection" in refused[0].details
        other = HeldStream(shard.stub(), [_header()])  # another connection still gets a stream
        held.append(other)
        assert other.sent.wait(WAIT)
        assert not other.done.wait(0.5)
    finally:
        _release_all(held)


def test_idle_streams_end_after_the_idle_timeout_and_free_their_slots(shards):
    shard = shards(streams=StreamLimits(max_streams=4, per_peer=4, idle_timeout=0.5, max_duration=600.0))
    stub = shard.stub()
    held = [HeldStream(stub, [_header(seq=1)]) for _ in range(4)]
    try:
        for s in held:
            assert s.done.wait(WAIT), "an idle stream was not ended"
        assert {s.code for s in held} == {C.DEADLINE_EXCEEDED}, {(s.code, s.details) for s in held}
        assert "idle timeout" in held[0].details
        _wait_until(lambda: shard.server.streams.open_streams == 0, "the idle streams' slots freed")
        assert shard.server.streams.counts["idle"] == 4
        # the header alone would be a valid empty push: a stream ended this way applies nothing
        stats = shard.client.stats()[0]
        assert stats.version == 0 and all(w.last_seq < 1 for w in stats.workers if w.worker == 0)
        # the slots are free: a full streamed push goes through (tiny chunks force a stream)
        client = PSClient([shard.address], place({n: (s, d) for n, (s, d) in VARS.items()}, 1), shard.cfg,
                          chunk_bytes=64 << 10, unary_bytes=0)
        try:
            results = client.push({"w": np.ones((256, 256), np.float32)}, [0], 0, 1)
        finally:
            client.close()
        assert results[0].result == "APPLIED"
    finally:
        _release_all(held)


def test_a_stream_past_its_deadline_ends_even_when_it_keeps_sending(shards):
    # max_duration bounds a stream that never idles long enough: a header, then one small
    # piece every 0.05 s (each resets the idle clock), for ever
    shard = shards(streams=StreamLimits(max_streams=4, per_peer=4, idle_timeout=600.0, max_duration=1.0))
    stop = threading.Event()

    def trickle():
        yield _header()
        offset = 0
        while not stop.is_set() and offset < W_BYTES:
            yield _piece_message("w", (256, 256), b"\0" * 64, W_BYTES, offset=offset)
            offset += 64
            time.sleep(0.05)

    try:
        future = shard.stub().Push.future(trickle(), timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=WAIT)
        assert err.value.code() == C.DEADLINE_EXCEEDED and "deadline" in err.value.details()
    finally:
        stop.set()


def test_deadline_exceeded_and_resource_exhausted_are_retried_by_workers():
    assert C.DEADLINE_EXCEEDED in ps_client.RETRIED_CODES
    assert C.RESOURCE_EXHAUSTED in ps_client.RETRIED_CODES
    assert C.INVALID_ARGUMENT not in ps_client.RETRIED_CODES


# ----------------------------------------------------------------------------------------------
# Item 7: memory before validation


def _traced_peak_during(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


HUGE = 1 << 30  # elements: a 4 GiB float32 tensor


@pytest.mark.parametrize("case, first, code", [
    ("unknown variable", lambda: _piece_message("nope", (HUGE,), b"\0" * (1 << 20), 4 * HUGE), C.NOT_FOUND),
    ("larger than the variable", lambda: _piece_message("w", (HUGE,), b"\0" * (1 << 20), 4 * HUGE),
     C.INVALID_ARGUMENT),
    ("more sparse rows than the variable", lambda: _piece_message(
        "emb", (1 << 20, 8), b"\0" * (1 << 20), (1 << 20) * 32, sparse=True, rows=b"\0" * (8 << 20)),
     C.INVALID_ARGUMENT),
    ("a gradient of a dtype the variable is not", lambda: _piece_message(
        "w", (256, 256), b"\0" * 1024, 8 * 256 * 256, dtype="float64"), C.INVALID_ARGUMENT),
])
def test_a_declaration_the_shard_cannot_take_is_refused_before_its_data(shards, case, first, code):
    shard = shards()
    message = first()

    def attempt():
        held = HeldStream(shard.stub(), [_header(), message])
        try:
            # refused while the client still holds the rest of the data back
            assert held.done.wait(WAIT), f"{case}: not refused before the data was sent"
            return held.code, held.details
        finally:
            _release_all([held])

    (got, details), peak = _traced_peak_during(attempt)
    assert got == code, f"{case}: {got} {details}"
    # nothing of the declared size was allocated (the messages, a few MiB, are)
    assert peak < 256 << 20, f"{case}: {peak / 2**20:.0f} MiB allocated while refusing"
    assert shard.client.stats()[0].version == 0


def test_streamed_pushes_in_flight_are_capped_by_the_byte_budget(shards):
    shard = shards(push_bytes=W_BYTES + W_BYTES // 2)  # room for one push of w, not two
    first_half = _piece_message("w", (256, 256), b"\0" * (W_BYTES // 2), W_BYTES)
    rest = [_piece_message("w", (256, 256), np.full(W_BYTES // 8, 1, np.float32).tobytes(), W_BYTES,
                           offset=W_BYTES // 2)]
    a = HeldStream(shard.stub(), [_header(seq=1), first_half], rest)
    try:
        _wait_until(lambda: shard.server.servicer.budget.in_use >= W_BYTES, "the first push charged to the budget")
        b = HeldStream(shard.stub(), [_header(seq=2), first_half], rest)
        assert b.done.wait(WAIT)
        assert b.code == C.RESOURCE_EXHAUSTED and "no room for a push" in b.details, (b.code, b.details)
        a.release()
        assert a.done.wait(WAIT) and a.code == C.OK, (a.code, a.details)
        assert a.reply.result == ps_pb2.PushReply.APPLIED
        _wait_until(lambda: shard.server.servicer.budget.in_use == 0, "the budget returned")
        c = HeldStream(shard.stub(), [_header(seq=2), first_half], rest)
        c.release()
        assert c.done.wait(WAIT) and c.code == C.OK, (c.code, c.details)
    finally:
        _release_all([a])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_cancelled_stream_returns_its_memory_and_budget(shards):
    n = 4096  # a 64 MiB variable; the stream sends 48 MiB of it, then stops
    big = n * n * 4
    shard = shards(vars={"big": ((n, n), np.float32)})
    data = np.ones(1 << 18, np.float32).tobytes()  # 1 MiB pieces
    messages = [_header()] + [_piece_message("big", (n, n), data, big, offset=i << 20) for i in range(48)]
    before = _rss_bytes()
    held = HeldStream(shard.stub(), messages)
    assert held.sent.wait(WAIT)
    _wait_until(lambda: shard.server.servicer.budget.in_use >= big, "the stream's declaration charged")
    _wait_until(lambda: _rss_bytes() > before + (40 << 20), "the 48 MiB sent held by the shard")
    during = _rss_bytes()
    held.future.cancel()
    assert held.done.wait(WAIT)
    _wait_until(lambda: shard.server.servicer.budget.in_use == 0, "the cancelled stream's budget returned")
    _wait_until(lambda: _rss_bytes() < during - (24 << 20), "the cancelled stream's memory returned", timeout=20)
    held.release()
    assert _rss_bytes() < before + (32 << 20)


def test_data_streams_cannot_use_up_the_chiefs_control_quota():
    """With every data-stream slot held by idle Push streams, the chief's Restore is still admitted."""
    from asyncps.protos.serving import StreamGuard, StreamLimits

    guard = StreamGuard(StreamLimits(max_streams=2, per_peer=2, idle_timeout=60.0, max_duration=60.0))

    class Context:
        def __init__(self, peer):
            self._peer = peer

        def peer(self):
            return self._peer

        def time_remaining(self):
            return None

        def abort(self, code, details):
            raise RuntimeError(f"{code}: {details}")

    held = [guard._admit(Context(f"ipv4:10.0.0.{i}:1"), "/asyncps.ParameterServer/Push") for i in range(2)]
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        guard._admit(Context("ipv4:10.0.0.9:1"), "/asyncps.ParameterServer/Push")
    control = guard._admit(Context("ipv4:10.0.0.5:1"), "/asyncps.ParameterServer/Restore")
    assert control.control
    for stream in [*held, control]:
        guard._release(stream)
    assert guard.open_streams == 0


def test_a_small_tensor_in_a_padded_message_does_not_keep_the_message_alive():
    """The byte budget charges tensor bytes; a zero-copy view would keep a 60 MiB padded message
    alive for a 2 KiB tensor. Decoded tensors of a message mostly made of padding are copies."""
    from asyncps.protos import codec

    (message,) = list(codec.encode_wire({"emb": np.ones((16, 32), np.float32)}, b"", codec.CHUNK_BYTES))
    padding = b"\x9a\x06" + _varint(8 << 20) + b"\0" * (8 << 20)  # an unknown length-delimited field 99
    asm = codec.Assembler()
    asm.add_wire(bytes(message) + padding)
    emb = asm.finish()["emb"]
    assert emb.base is None or emb.base.nbytes <= 2 * emb.nbytes + codec.OWNED_SLACK
    np.testing.assert_array_equal(emb, np.ones((16, 32), np.float32))
    plain = codec.Assembler()
    plain.add_wire(bytes(message))
    assert plain.finish()["emb"].base is not None  # an ordinary message is still decoded without a copy


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])
