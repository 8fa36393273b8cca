"""Where a 1 MiB push over gRPC spends its time: raw gRPC's own floor against each layer asyncps adds.

    python bench/grpc_floor.py [--mib 1] [--calls 1000] [--reps 3]

`bench/transport.py` gives the ratio (raw gRPC / asyncps); this gives its parts. One server
process (spawned) hosts a bare bytes service (bench/transport.py's, identity serializers), a
shard with a no-op optimizer and a shard with SGD; the client calls each back to back:

    raw unary            a prebuilt bytes object -> b"" (the transport bench's raw push)
    raw unary, fresh     a new bytes object per call (`tobytes()`), as any real sender has
    raw unary, 64 B      the per-call floor: what a call costs with no payload to speak of
    raw bidi, 64 B/MiB   one message each way on a stream held open across calls
    PushOne no-op        a prebuilt asyncps push message to the no-op shard (server side only)
    push no-op           PSClient.push to the no-op shard (+ the client's encoding)
    push SGD             PSClient.push to the SGD shard (+ the update's math)

Per call: median wall ms, and CPU us of the server process and of the client process (all
threads, gRPC's included) over `--calls` calls; for the shard's PushOne, the handler thread's
CPU and the part of it inside `Shard.push` (validation, admission, the optimizer). Medians over
`--reps` rounds, the operations interleaved round by round. The budget line says how many us
asyncps may add to the raw unary push for a ratio of 0.85.
"""
from __future__ import annotations

import argparse
import itertools
import queue
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import cpu_seconds  # noqa: E402
import transport as T  # noqa: E402  (the raw service, the no-op optimizer, gRPC options)

from asyncps.allocator import tune_allocator  # noqa: E402

MIB = 1 << 20


def _timed_handlers(acc: dict) -> None:
    """Wraps the shard's PushOne handler and Shard.push to add up their thread CPU (this process)."""
    from asyncps.ps.servicer import ParameterServerServicer
    from asyncps.ps.shard import Shard

    push_one, shard_push = ParameterServerServicer.PushOne, Shard.push

    def timed_push_one(self, request, context):
        t0 = time.thread_time()
        try:
            return push_one(self, request, context)
        finally:
            acc["handler"] += time.thread_time() - t0
            acc["calls"] += 1

    def timed_shard_push(self, *a, **kw):
        t0 = time.thread_time()
        try:
            return shard_push(self, *a, **kw)
        finally:
            acc["shard_push"] += time.thread_time() - t0

    # patched on the classes before any server exists: every handler built afterwards is timed
    setattr(ParameterServerServicer, "PushOne", timed_push_one)
    setattr(Shard, "push", timed_shard_push)


def _bidi_echo(requests, context):
    for _ in requests:
        yield b""


def _server_main(conn, mib: int) -> None:
    """Child: raw service (+ a bidi echo), no-op shard, SGD shard; answers "handler" with the
    handler thread CPU added up so far, serves until "stop"."""
    tune_allocator()
    import grpc

    from asyncps.config import Config
    from asyncps.ps.server import ShardServer
    from asyncps.ps.shard import Shard

    acc = {"handler": 0.0, "shard_push": 0.0, "calls": 0}
    _timed_handlers(acc)
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers = 1, 1
    raw = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=T.OPTIONS)
    raw.add_generic_rpc_handlers((T._raw_handlers(grpc, mib), grpc.method_handlers_generic_handler("raw.Bidi", {
        "Echo": grpc.stream_stream_rpc_method_handler(_bidi_echo)})))
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    raw.start()
    noop = ShardServer(cfg, 0, shard=Shard(cfg, 0, optimizer=T.NoOpOptimizer()))
    sgd = ShardServer(cfg, 0)
    conn.send((raw_port, noop.start(), sgd.start()))
    while conn.recv() != "stop":
        conn.send(dict(acc))
    for server in (raw, noop, sgd):
        server.stop(0)


class _Bidi:
    """One stream held open: each call puts one message and waits for the one reply."""

    def __init__(self, channel):
        self._queue: queue.Queue = queue.Queue()
        stream = channel.stream_stream("/raw.Bidi/Echo", request_serializer=T._identity,
                                       response_deserializer=T._identity)
        self._replies = stream(iter(self._queue.get, None))

    def __call__(self, payload: bytes) -> None:
        self._queue.put(payload)
        next(self._replies)

    def close(self) -> None:
        self._queue.put(None)


def run(mib: int, calls: int, reps: int) -> list[dict]:
    import multiprocessing as mp

    import grpc

    from asyncps.config import Config
    from asyncps.partition import place
    from asyncps.ps_client import PSClient

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(child, mib), daemon=True)
    server.start()
    raw_port, noop_port, sgd_port = parent.recv()
    server_pid = server.pid
    assert server_pid is not None  # started
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, 1, 600.0
    cfg.cluster.transport = "grpc"  # the gRPC path is what this measures
    grad = {"x": np.full(mib * MIB // 4, 1e-6, np.float32)}
    placement = place({"x": (grad["x"].shape, grad["x"].dtype)}, 1)
    clients = {}
    for name, port in (("noop", noop_port), ("sgd", sgd_port)):
        clients[name] = PSClient([f"127.0.0.1:{port}"], placement, cfg)
        clients[name].init({"x": np.zeros_like(grad["x"])})
        clients[name].register(0)
    channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=T.OPTIONS)
    raw = channel.unary_unary("/raw.Raw/PushUnary", request_serializer=T._identity, response_deserializer=T._identity)
    bidi = _Bidi(channel)
    blob, small = grad["x"].tobytes(), b"x" * 64
    seq = itertools.count(1)
    push_one = clients["noop"]._stubs[0].PushOne
    ops = {
        "raw unary": lambda: raw(blob, timeout=60),
        "raw unary, fresh": lambda: raw(grad["x"].tobytes(), timeout=60),
        "raw unary, 64 B": lambda: raw(small, timeout=60),
        "raw bidi, 64 B": lambda: bidi(small),
        f"raw bidi, {mib} MiB": lambda: bidi(blob),
        "PushOne no-op": lambda: push_one(PSClient._push_message(grad, 0, 0, next(seq)), timeout=60),
        "push no-op": lambda: clients["noop"].push(grad, [0], 0, next(seq)),
        "push SGD": lambda: clients["sgd"].push(grad, [0], 0, next(seq)),
    }
    samples: dict[str, list[dict]] = {k: [] for k in ops}
    try:
        for _ in range(reps):
            for name, op in ops.items():
                for _ in range(max(calls // 10, 10)):  # warm, and out of the last operation's wake-up
                    op()
                parent.send("handler")
                before = parent.recv()
                s0, c0, walls = cpu_seconds(server_pid), time.process_time(), []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    op()
                    walls.append(time.perf_counter() - t0)
                s1, c1 = cpu_seconds(server_pid), time.process_time()
                parent.send("handler")
                after = parent.recv()
                n = after["calls"] - before["calls"]
                samples[name].append({
                    "wall_ms": statistics.median(walls) * 1e3,
                    "server_cpu_us": (s1 - s0) / calls * 1e6, "client_cpu_us": (c1 - c0) / calls * 1e6,
                    "handler_us": (after["handler"] - before["handler"]) / n * 1e6 if n else None,
                    "shard_push_us": (after["shard_push"] - before["shard_push"]) / n * 1e6 if n else None,
                })
    finally:
        bidi.close()
        for client in clients.values():
            client.close()
        channel.close()
        parent.send("stop")
    return [{"op": name, **{k: _median([s[k] for s in rows]) for k in rows[0]}} for name, rows in samples.items()]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    tune_allocator()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1, help="payload of the pushes (MiB)")
    parser.add_argument("--calls", type=int, default=1000, help="timed calls of each operation per round")
    parser.add_argument("--reps", type=int, default=3, help="rounds")
    args = parser.parse_args(argv)
    from asyncps.ps_client import UNARY_BYTES

    if not 1 <= args.mib * MIB <= UNARY_BYTES:  # larger pushes stream (bench/transport.py measures them)
        parser.error(f"--mib must be 1-{UNARY_BYTES // MIB}: PSClient sends pushes up to that size as one unary call")
    rows = run(args.mib, args.calls, args.reps)
    print(f"{args.mib} MiB pushes, {args.calls} calls x {args.reps} rounds (medians)")
    print(f"{'operation':<20} {'wall ms':>8} {'server CPU us':>14} {'client CPU us':>14} {'handler us':>11} {'Shard.push us':>14}")
    for r in rows:
        extra = "" if r["handler_us"] is None else f" {r['handler_us']:>11.0f} {r['shard_push_us']:>14.0f}"
        print(f"{r['op']:<20} {r['wall_ms']:>8.3f} {r['server_cpu_us']:>14.0f} {r['client_cpu_us']:>14.0f}{extra}")
    raw = next(r["wall_ms"] for r in rows if r["op"] == "raw unary")
    print(f"budget at 0.85 of raw unary: {(raw / 0.85 - raw) * 1e3:.0f} us over its {raw * 1e3:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
