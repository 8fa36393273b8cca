"""Transport benchmark: push and pull through PSClient + shard vs raw gRPC bytes, same machine.

    python bench/transport.py [--sizes-mib 1 16 256] [--repeats 15 7 3] [--block 10 3 1] [--split]
                              [--json out.json] [--unary-bytes N]

One server process (spawned, so no gRPC object crosses a fork; `--split`: one per server, as a
shard process holds one shard) hosts both a parameter-server shard (SGD, async) and a bare bytes
service with identity serializers and no protobuf:
    /raw.Raw/PushUnary   bytes -> b""                      /raw.Raw/PullUnary   size -> bytes
    /raw.Raw/PushStream  stream of 1 MiB bytes -> b""      /raw.Raw/PullStream  size -> stream of 1 MiB
The raw side sends and serves prebuilt buffers, so it measures the transport alone. The asyncps
side does everything a worker sees: encode, chunk, send, decode, validate, apply (push) or
encode, send, reassemble, join (pull). A second shard with a no-op optimizer isolates the wire
path (codec + gRPC + validation) from the update math (SGD on N bytes is two passes over them).
Reported: median seconds, GB/s, and best raw / asyncps (1.0 = as fast as raw gRPC).

Timing: the operations of one size are interleaved in rounds, so that a change in the machine's
load hits all of them alike. `--block K` (default 10 at 1 MiB, fewer for larger sizes): in each
round every operation runs 1 + K calls back to back, the first not timed, so each is measured in
the same state, warm, as a worker's consecutive calls to one shard. `--block 0`: one timed call
of each per round (the method before), where each call follows a call of another operation,
often to another server, and pays that server's wake-up: a raw 1 MiB push took 0.65 ms back to
back and 0.84 / 1.12 ms after 2 / 10 ms idle on the 2-core machine, and that method's ratios at
1 MiB moved 0.53-0.90 between runs (docs/performance.md, issue 14's sixth pass).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent import futures

import numpy as np

from asyncps.allocator import tune_allocator

CHUNK = 1 << 20
MIB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _identity(x):
    return x


def _raw_handlers(grpc, max_mib: int):
    """Generic handlers of the bare bytes service (no protobuf anywhere)."""
    blob = np.random.default_rng(0).bytes(max_mib * MIB)
    chunks = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]

    def push_unary(request, context):
        return b""

    def push_stream(request_iterator, context):
        for _ in request_iterator:
            pass
        return b""

    def pull_unary(request, context):
        return blob[: int.from_bytes(request, "little")]

    def pull_stream(request, context):
        yield from chunks[: int.from_bytes(request, "little") // CHUNK]

    kw = dict(request_deserializer=_identity, response_serializer=_identity)
    return grpc.method_handlers_generic_handler("raw.Raw", {
        "PushUnary": grpc.unary_unary_rpc_method_handler(push_unary, **kw),
        "PushStream": grpc.stream_unary_rpc_method_handler(push_stream, **kw),
        "PullUnary": grpc.unary_unary_rpc_method_handler(pull_unary, **kw),
        "PullStream": grpc.unary_stream_rpc_method_handler(pull_stream, **kw),
    })


class NoOpOptimizer:
    """Accepts every update and does nothing: isolates the wire path from the update math."""

    name, slot_names = "sgd", ()

    def init_slots(self, value):
        return {}

    def apply_dense(self, value, grad, slots, lr, step):
        pass

    def apply_sparse(self, value, rows, grad_rows, slots, lr, step):
        pass


SERVERS = ("sgd", "noop", "raw")


def _server_main(conn, max_mib: int, which: tuple[str, ...] = SERVERS) -> None:
    tune_allocator()  # as every asyncps process does (common/allocator.py)
    """Child process: the servers in `which` (SGD shard, no-op shard, raw server); sends their
    ports in that order, serves until told."""
    import grpc

    from asyncps.config import Config
    from asyncps.ps.server import ShardServer
    from asyncps.ps.shard import Shard

    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers = 1, 1
    servers: list = []  # grpc.Server and ShardServer: both stop(grace)
    ports: list[int] = []
    for kind in which:
        if kind == "raw":
            raw = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
            raw.add_generic_rpc_handlers((_raw_handlers(grpc, max_mib),))
            ports.append(raw.add_insecure_port("127.0.0.1:0"))
            raw.start()
            servers.append(raw)
        else:
            shard = ShardServer(cfg, 0) if kind == "sgd" else ShardServer(cfg, 0, shard=Shard(cfg, 0, optimizer=NoOpOptimizer()))
            ports.append(shard.start())
            servers.append(shard)
    conn.send(tuple(ports))
    conn.recv()
    for server in servers:
        server.stop(0)


def _interleaved_medians(calls: dict, repeats: int, block: int = 0) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds, the calls interleaved, one warm-up
    round first. `block` 0: one call of each per round; K > 0: per round, each call 1 + K times
    in a row, the first not timed (module docstring)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for rnd in range(repeats + 1):
        for k, fn in calls.items():
            if block:
                fn()  # the block's untimed first call
            for _ in range(max(block, 1)):
                t0 = time.perf_counter()
                fn()
                if rnd:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _raw_calls(channel, nbytes: int):
    """The four raw operations for one size."""
    kw = dict(request_serializer=_identity, response_deserializer=_identity)
    push_u = channel.unary_unary("/raw.Raw/PushUnary", **kw)
    push_s = channel.stream_unary("/raw.Raw/PushStream", **kw)
    pull_u = channel.unary_unary("/raw.Raw/PullUnary", **kw)
    pull_s = channel.unary_stream("/raw.Raw/PullStream", **kw)
    blob = np.random.default_rng(1).bytes(nbytes)
    chunks = [blob[i : i + CHUNK] for i in range(0, nbytes, CHUNK)]
    size = nbytes.to_bytes(8, "little")
    return {
        "push_unary": lambda: push_u(blob, timeout=600),
        "push_stream": lambda: push_s(iter(chunks), timeout=600),
        "pull_unary": lambda: len(pull_u(size, timeout=600)),
        "pull_stream": lambda: sum(len(c) for c in pull_s(size, timeout=600)),
    }


def _asyncps_calls(client, name: str, nbytes: int, seq):
    """Push of one gradient of `nbytes` and pull of the variable, through PSClient + shard."""
    grad = {name: np.full(nbytes // 4, 1e-6, np.float32)}
    return {
        "push": lambda: client.push(grad, [0], 0, next(seq)),  # read_version 0: staleness grows, SGD ignores it
        "pull": lambda: client.pull([name]),
    }


def run(sizes_mib: list[int], repeats: list[int], unary_bytes: int | None = None, split: bool = False,
        blocks: list[int] | None = None) -> list[dict]:
    """Measures every size; one row per (size, direction). `split`: each server in a process of
    its own (as a shard process holds one shard) instead of all three in one. `blocks`: per size,
    the calls of an operation in a row per round (0: one; see the module docstring)."""
    import grpc

    from asyncps.config import Config
    from asyncps.partition import place
    from asyncps.ps_client import UNARY_BYTES, PSClient

    ctx = mp.get_context("spawn")
    groups = [(kind,) for kind in SERVERS] if split else [SERVERS]
    pipes: list = []
    ports: dict[str, int] = {}
    for which in groups:
        parent, child = ctx.Pipe()
        ctx.Process(target=_server_main, args=(child, max(sizes_mib), which), daemon=True).start()
        pipes.append((parent, which))
    for parent, which in pipes:
        ports.update(zip(which, parent.recv()))
    sgd_port, noop_port, raw_port = (ports[kind] for kind in SERVERS)
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.rpc_timeout = 1, 1, 600.0
    cfg.cluster.transport = "grpc"  # this bench measures the gRPC path against raw gRPC
    variables = {f"x{mib}": np.zeros(mib * MIB // 4, np.float32) for mib in sizes_mib}
    placement = place({n: (a.shape, a.dtype) for n, a in variables.items()}, 1)
    rows = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=OPTIONS)
        unary = UNARY_BYTES if unary_bytes is None else unary_bytes
        clients = {k: PSClient([f"127.0.0.1:{p}"], placement, cfg, unary_bytes=unary)
                   for k, p in (("sgd", sgd_port), ("noop", noop_port))}
        for client in clients.values():
            client.init(variables)
            client.register(0)
        del variables
        seq = iter(range(1 << 40))
        for mib, reps, block in zip(sizes_mib, repeats, blocks or [0] * len(sizes_mib)):
            nbytes = mib * MIB
            calls = {f"raw_{k}": f for k, f in _raw_calls(channel, nbytes).items()}
            calls.update({f"{k}_{op}": f for k, client in clients.items()
                          for op, f in _asyncps_calls(client, f"x{mib}", nbytes, seq).items()})
            med = _interleaved_medians(calls, reps, block)
            raw = {k[4:]: v for k, v in med.items() if k.startswith("raw_")}
            ours = {k: v for k, v in med.items() if not k.startswith("raw_")}
            rows += [_row(mib, d, reps, block, nbytes, ours, raw) for d in ("push", "pull")]
        for client in clients.values():
            client.close()
        channel.close()
    finally:
        for parent, _ in pipes:
            parent.send("stop")
    return rows


def _row(mib, direction, reps, block, nbytes, ours, raw) -> dict:
    best = min(raw[f"{direction}_unary"], raw[f"{direction}_stream"])
    sgd, noop = ours[f"sgd_{direction}"], ours[f"noop_{direction}"]
    return {
        "mib": mib, "direction": direction, "repeats": reps, "block": block,
        "asyncps_sgd_s": sgd, "asyncps_noop_s": noop,
        "raw_unary_s": raw[f"{direction}_unary"], "raw_stream_s": raw[f"{direction}_stream"],
        "asyncps_gbps": nbytes / sgd / 1e9, "raw_best_gbps": nbytes / best / 1e9,
        "ratio_sgd": best / sgd, "ratio_noop": best / noop,
    }


def main(argv=None) -> int:
    tune_allocator()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, nargs="+", default=[15, 7, 3])
    parser.add_argument("--block", type=int, nargs="+", default=None,
                        help="per size, calls of an operation in a row per round, the first untimed "
                             "(default 10 at 1 MiB, 3 at 16, 1 at 256 and above; 0: one call each)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--unary-bytes", type=int, default=None,
                        help="PSClient unary_bytes: transfers up to this size go as one unary message")
    parser.add_argument("--split", action="store_true",
                        help="each server (SGD shard, no-op shard, raw) in a process of its own")
    args = parser.parse_args(argv)
    n = len(args.sizes_mib)
    blocks = args.block or [10 if mib <= 1 else 3 if mib <= 16 else 1 for mib in args.sizes_mib]
    repeats, blocks = (x * n if len(x) == 1 else x for x in (args.repeats, blocks))
    if len(repeats) < n or len(blocks) < n:
        parser.error("--repeats and --block take one number for all sizes or one per size")
    rows = run(args.sizes_mib, repeats[:n], args.unary_bytes, args.split, blocks[:n])
    print(f"{'size':>8} {'dir':>5} {'asyncps s':>10} {'no-op opt s':>11} {'raw unary s':>12} {'raw stream s':>13} "
          f"{'asyncps GB/s':>13} {'raw GB/s':>9} {'ratio':>6} {'ratio no-op':>11}")
    for r in rows:
        print(f"{r['mib']:>5}MiB {r['direction']:>5} {r['asyncps_sgd_s']:>10.4f} {r['asyncps_noop_s']:>11.4f} "
              f"{r['raw_unary_s']:>12.4f} {r['raw_stream_s']:>13.4f} {r['asyncps_gbps']:>13.3f} "
              f"{r['raw_best_gbps']:>9.3f} {r['ratio_sgd']:>6.2f} {r['ratio_noop']:>11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
