"""One worker's round trip, isolated: PSClient.push_pull of MNIST-MLP-sized gradients to a shard.

    python bench/pushpull.py [--calls 2000] [--clients 1] [--shards 1] [--reps 3] [--profile OUT]
                             [--compression none fp16 bf16] [--transport grpc shm]

A shard server (SGD, async; one process per shard, spawned) and `--clients` client processes
that each call `push_pull` in a loop with the gradients of the 784-256-256-10 MLP (6 tensors,
1.08 MB) and no compute in between. Reported per round trip (median over `--reps`):
wall milliseconds, client CPU milliseconds and shard CPU milliseconds (user + system of the
whole process, gRPC threads included). On a 2-core machine the CPU milliseconds are what the
cluster pays per step on top of the model's own math; the wall time bounds one worker's rate.
The client reads pulled values as the worker's loop does (PSClient.pulled_views: over shared
memory, views of the segment instead of copies).
`--compression raw` measures the floor instead: a bare gRPC unary call carrying the same number of
bytes each way (identity serializers, prebuilt buffers, no work at either end).
`--transport grpc shm`: the client's cluster.transport (default grpc), each setting interleaved
with the others; shm moves the tensors through the shared-memory segment (common/shm.py).
`--tiny` pushes six 8-float tensors instead (`--tiny-tensors N`: N of them; no bytes to speak of: the
fixed cost of a round trip, and what each tensor adds to it;
not with `--compression raw`, whose floor is the MLP's bytes).
`--profile OUT` writes a cProfile of client 0 (and OUT.ps<i>, a yappi CPU profile of every thread
of each shard) for the last rep.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
from multiprocessing.process import BaseProcess
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches' shared helpers
from procstat import cpu_seconds  # noqa: E402

import numpy as np

from asyncps.allocator import tune_allocator

MLP_SHAPES = {"dense0/w": (784, 256), "dense0/b": (256,), "dense1/w": (256, 256), "dense1/b": (256,),
              "dense2/w": (256, 10), "dense2/b": (10,)}
def tiny_shapes(n: int = 6) -> dict[str, tuple[int, ...]]:
    """--tiny: n 8-float tensors, the same calls with no bytes to speak of: the fixed cost of a
    round trip, and what each tensor adds to it."""
    return {f"tiny{i}": (8,) for i in range(n)}


def _server_main(conn, index: int, shards: int, workers: int, profile: str | None) -> None:
    tune_allocator()  # as every asyncps process does (common/allocator.py)
    from asyncps.config import Config
    from asyncps.ps.server import ShardServer

    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers = shards, workers
    server = ShardServer(cfg, index)
    conn.send(server.start())
    prof = None
    while True:
        msg = conn.recv()
        if msg == "profile" and profile:
            import yappi  # every thread (gRPC's pool runs the handlers), CPU clock

            yappi.set_clock_type("cpu")
            yappi.start()
            prof = yappi
        elif msg == "stop":
            break
    if prof is not None:
        prof.stop()
        prof.get_func_stats().save(f"{profile}.ps{index}", type="pstat")
    server.stop(0)


MLP_BYTES = sum(4 * int(np.prod(s)) for s in MLP_SHAPES.values())
_RAW_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _identity(x):
    return x


def _raw_server_main(conn, index: int, shards: int, workers: int, profile: str | None) -> None:
    tune_allocator()  # as every asyncps process does (common/allocator.py)
    """The floor: a bare gRPC server whose unary method takes MLP_BYTES and answers MLP_BYTES."""
    from concurrent import futures

    import grpc

    reply = np.random.default_rng(0).bytes(MLP_BYTES)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: reply, request_deserializer=_identity,
                                                  response_serializer=_identity)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=_RAW_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("raw.Raw", {"Echo": handler}),))
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    while conn.recv() != "stop":
        pass
    server.stop(0)


def _raw_client_main(conn, ports: list[int], worker: int, calls: int, *_ignored) -> None:
    tune_allocator()  # as every asyncps process does (common/allocator.py)
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}", options=_RAW_OPTIONS)
    echo = channel.unary_unary("/raw.Raw/Echo", request_serializer=_identity, response_deserializer=_identity)
    request = np.random.default_rng(1).bytes(MLP_BYTES)
    echo(request, timeout=30, wait_for_ready=True)
    conn.send("ready")
    while conn.recv() != "stop":
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            echo(request, timeout=30)
        conn.send((time.perf_counter() - t0, time.process_time() - cpu0))
    channel.close()


def _client_main(conn, ports: list[int], worker: int, calls: int, profile: str | None, unary: int | None,
                 compression: str = "none", shapes: dict | None = None) -> None:
    tune_allocator()  # as every asyncps process does (common/allocator.py)
    from asyncps.config import from_dict
    from asyncps.partition import place
    from asyncps.ps_client import UNARY_BYTES, PSClient

    compression, _, transport = compression.partition("@")
    cfg = from_dict({"cluster": {"ps": len(ports), "workers": 2, "compression": compression,
                                 "transport": transport or "grpc"}})  # validated: a typo is an error
    rng = np.random.default_rng(worker)
    shapes = shapes or MLP_SHAPES
    params = {n: rng.standard_normal(s).astype(np.float32) * 0.01 for n, s in shapes.items()}
    grads = {n: (rng.standard_normal(s) * 1e-6).astype(np.float32) for n, s in shapes.items()}
    placement = place({n: (v.shape, v.dtype) for n, v in params.items()}, len(ports))
    client = PSClient([f"127.0.0.1:{p}" for p in ports], placement, cfg,
                      unary_bytes=UNARY_BYTES if unary is None else unary)
    if hasattr(PSClient, "pulled_views"):  # as the worker's loop does (a checkout before it existed: copies)
        client.pulled_views = True
    client.init(params)
    client.register(worker)
    _, versions = client.pull(worker=worker)
    seq = 0
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        prof = None
        if msg == "profile" and profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            _, _, versions = client.push_pull(grads, versions, worker, seq)
            seq += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if prof is not None:
            prof.disable()
            assert profile is not None  # prof is made only when a path is given
            prof.dump_stats(profile)
        conn.send((wall, cpu))
    client.close()


def _answer(proc: BaseProcess, conn):
    """The next message from a child, or SystemExit once it has died (say, an import failed
    there): the bench never waits for a process that is gone."""
    while not conn.poll(0.5):
        if not proc.is_alive():
            raise SystemExit(f"bench/pushpull.py: {proc.name} exited with code {proc.exitcode} (its error is above)")
    return conn.recv()


def run(calls: int, clients: int, shards: int, reps: int, profile: str | None, unary: int | None = None,
        compression: str = "none", shapes: dict | None = None) -> list[dict]:
    ctx = mp.get_context("spawn")
    servers = []
    for i in range(shards):
        parent, child = ctx.Pipe()
        target = _raw_server_main if compression == "raw" else _server_main
        proc = ctx.Process(target=target, args=(child, i, shards, clients, profile), daemon=True)
        proc.start()
        servers.append((proc, parent, _answer(proc, parent)))
    ports = [port for _, _, port in servers]
    server_pids = [int(proc.pid or 0) for proc, _, _ in servers]  # started: each answered with its port
    workers = []
    for w in range(clients):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_raw_client_main if compression == "raw" else _client_main, args=(child, ports, w, calls, profile if w == 0 else None, unary, compression, shapes), daemon=True)
        proc.start()
        workers.append((proc, parent))
    for proc, conn in workers:
        assert _answer(proc, conn) == "ready"
    rows = []
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            last = rep == reps
            msg = "profile" if (last and profile) else "go"
            if last and profile:
                for _, conn, _ in servers:
                    conn.send("profile")
            ps_cpu0 = [cpu_seconds(pid) for pid in server_pids]
            t0 = time.perf_counter()
            for _, conn in workers:
                conn.send(msg)
            results = [_answer(proc, conn) for proc, conn in workers]
            wall = time.perf_counter() - t0
            ps_cpu = sum(cpu_seconds(pid) - c for pid, c in zip(server_pids, ps_cpu0))
            n = calls * clients
            if rep:
                rows.append({"calls_per_s": n / wall, "wall_ms": 1e3 * statistics.mean(r[0] for r in results) / calls,
                             "client_cpu_ms": 1e3 * sum(r[1] for r in results) / n, "ps_cpu_ms": 1e3 * ps_cpu / n})
    finally:
        for _, conn in workers:
            conn.send("stop")
        for _, conn, _ in servers:
            conn.send("stop")
        for proc, _ in workers:
            proc.join(30)
        for proc, _, _ in servers:
            proc.join(30)
    return rows


def step_costs(steps: int = 300, batch: int = 128) -> dict[str, float]:
    """CPU ms per step, in this process (one BLAS thread), of what a cluster step does besides the
    round trip: the MLP's gradient on real MNIST batches, and compressing it (fp16, bf16)."""
    from asyncps.config import load_config
    from asyncps.compression import ErrorFeedback
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model
    from asyncps.worker.step import GradientComputer, limit_blas_threads
    from asyncps.worker.variables import initial_params, trainable_names

    limit_blas_threads(1)
    cfg = load_config("configs/mnist_mlp.yaml", [])
    data = load_dataset(cfg.data, seed=0)
    model = build_model(cfg.model, data.meta)
    params = initial_params(cfg, model)
    compute = GradientComputer(model, trainable_names(params, cfg.train.frozen))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(data.x_train), batch) for _ in range(steps)]
    compressors = {f"compress {kind}": ErrorFeedback(kind) for kind in ("fp16", "bf16")}
    out = dict.fromkeys(["gradient", *compressors], 0.0)
    for idx in batches:  # each gradient compressed right after it is computed, as a worker does
        t0 = time.process_time()
        grads = compute(params, data.x_train[idx], data.y_train[idx], rng)[1]
        out["gradient"] += time.process_time() - t0
        for name, ef in compressors.items():
            t0 = time.process_time()
            ef(grads)
            out[name] += time.process_time() - t0
    return {k: 1e3 * v / steps for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--unary-bytes", type=int, default=None, help="PSClient unary_bytes (0: streams only)")
    parser.add_argument("--compression", nargs="+", default=["none"], choices=["none", "fp16", "bf16", "raw"],
                        help="cluster.compression of the client; several: interleaved, one setting per rep; "
                             "raw: the floor, a bare gRPC unary call with the same bytes each way and no work")
    parser.add_argument("--step-costs", action="store_true",
                        help="also print the CPU ms per step of the MLP gradient and of compressing it")
    parser.add_argument("--tiny", action="store_true",
                        help="six 8-float tensors instead of the MLP's: the fixed cost of a round trip")
    parser.add_argument("--tiny-tensors", type=int, default=6, metavar="N",
                        help="with --tiny: this many 8-float tensors (what each tensor costs)")
    parser.add_argument("--transport", nargs="+", default=["grpc"], choices=["grpc", "shm", "auto"],
                        help="cluster.transport of the client; several: interleaved")
    args = parser.parse_args(argv)
    settings = list(dict.fromkeys(k if k == "raw" else f"{k}@{t}" for k in args.compression for t in args.transport))
    if args.step_costs:
        costs = [step_costs() for _ in range(args.reps)]
        print("per step, CPU ms (medians): " + ", ".join(
            f"{k} {statistics.median(c[k] for c in costs):.2f}" for k in costs[0]))
    rows: dict[str, list[dict]] = {}
    for rep in range(args.reps):  # interleaved: rep 1 of every setting, then rep 2, ...
        for kind in settings:
            rows.setdefault(kind, []).extend(run(args.calls, args.clients, args.shards, 1, args.profile,
                                                 args.unary_bytes, kind,
                                                 tiny_shapes(args.tiny_tensors) if args.tiny else None))
    model = f"{args.tiny_tensors} tensors of 8 floats (--tiny)" if args.tiny else "MLP 1.08 MB"
    print(f"push_pull {model}, {args.clients} client(s), {args.shards} shard(s), {args.calls} calls x {args.reps} reps (medians)")
    for kind, kind_rows in rows.items():
        med = {k: statistics.median(r[k] for r in kind_rows) for k in kind_rows[0]}
        print(f"  compression@transport {kind:>9}: total calls/s {med['calls_per_s']:.0f}   wall/call {med['wall_ms']:.2f} ms   "
              f"client CPU/call {med['client_cpu_ms']:.2f} ms   shard CPU/call {med['ps_cpu_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
