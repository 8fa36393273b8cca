"""What staleness recording costs: cluster throughput with it on and off, and the per-push cost.

    python bench/staleness_overhead.py [--config configs/mnist_softmax.yaml] [--steps 3000] [--reps 5]
                                       [--workers 2] [--shards 1] [--skip-cluster]

1. Cluster: the same short run launched with telemetry as shipped (`on`: exact per-push
   staleness counters, a `telemetry` row every second) and with it off (`off`:
   `telemetry.record_staleness=false telemetry.every_seconds=0`: the shard only counts pushes),
   interleaved on/off/on/off... so machine noise hits both alike. Steady-state steps/s between the
   chief's progress rows (first 10% of the steps and the final evaluation excluded). Prints the
   medians and the ratio off/on (the overhead is ratio - 1).
2. Micro: the recording itself (`WorkerCounters.record_applied` against the count alone), next
   to the time the shard takes to apply one push of the config's model (validation + optimizer,
   in process, no gRPC), the cost of one Stats read (what the chief's polling adds), and
   push-pull round trips through a real gRPC shard with recording switched on and off every
   block of 100 calls (the finest A/B: same process, load drift cancels).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import cluster_rate  # noqa: E402  (bench/cluster.py: launch + steady-state rate)

VARIANTS = {
    "on": ("telemetry.every_seconds=1",),
    "off": ("telemetry.record_staleness=false", "telemetry.every_seconds=0"),
}


def cluster_overhead(args) -> None:
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}  # CPU seconds of the whole launch
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                before = _children_cpu()
                rate = cluster_rate(args.config, args.steps, args.workers, args.shards, Path(tmp) / f"{name}{rep}",
                                    ("train.eval_every=0",) + VARIANTS[name])
                rates[name].append(rate)
                cpu[name].append(_children_cpu() - before)
                print(f"rep {rep} {name:>3}: {rate:8.1f} steps/s, {cpu[name][-1]:6.2f} CPU s", flush=True)
    on, off = (statistics.median(rates[n]) for n in ("on", "off"))
    print(f"\ncluster {args.config} ({args.workers} workers, {args.shards} shard(s), {args.steps} steps, {args.reps} reps)")
    print(f"median steps/s: on {on:.1f}, off {off:.1f}; off/on = {off / on:.4f} "
          f"(recording costs {100 * (off / on - 1):+.2f}% of throughput)")
    paired = [b / a for a, b in zip(rates["on"], rates["off"])]  # same rep: similar machine load
    print(f"median of paired off/on ratios: {statistics.median(paired):.4f} "
          f"(spread {min(paired):.3f}..{max(paired):.3f})")
    con, coff = (statistics.median(cpu[n]) for n in ("on", "off"))
    print(f"median CPU seconds of a whole launch (every process, start-up and final eval included, less "
          f"sensitive to the machine's load than steps/s): on {con:.2f}, off {coff:.2f}; on/off = {con / coff:.4f}")
    print("all on :", " ".join(f"{r:.1f}" for r in rates["on"]))
    print("all off:", " ".join(f"{r:.1f}" for r in rates["off"]))


def _children_cpu() -> float:
    """User + system CPU seconds of every reaped descendant (the launcher reaps its children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def micro(args) -> None:
    import numpy as np

    from asyncps.config import load_config
    from asyncps.ps import counters
    from asyncps.ps.counters import WorkerCounters
    from asyncps.ps.shard import Shard
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model
    from asyncps.worker.variables import initial_params

    cfg = load_config(args.config, [f"cluster.workers={args.workers}", "cluster.ps=1"])
    n = 200_000
    w = WorkerCounters(0)
    # CPU time of this thread, not wall time: a descheduled moment (the machine is shared) is not counted
    best = lambda stmt: min(timeit.repeat(stmt, number=n, repeat=5, timer=time.thread_time)) / n * 1e9  # noqa: E731
    record_ns = best(lambda: w.record_applied(3))
    count_ns = best(lambda: w._count_applied(3))
    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    params = initial_params(cfg, build_model(cfg.model, data.meta))
    shard = Shard(cfg, 0)
    shard.init(params)
    for i in range(args.workers):
        shard.register_worker(i)
    grads = {k: np.full_like(v, 1e-6) for k, v in params.items()}
    times: dict[bool, list[float]] = {True: [], False: []}
    seq = 0
    for block in range(40):  # interleaved blocks: recording on, off, on, ... (the machine is shared)
        on = block % 2 == 0
        counters.set_recording(on)
        started = time.thread_time()
        for _ in range(50):
            shard.push(seq % args.workers, seq // args.workers, max(0, shard.version - 2), grads)
            seq += 1
        times[on].append((time.thread_time() - started) / 50 * 1e6)
    counters.set_recording(True)
    stats_us = min(timeit.repeat(shard.stats, number=200, repeat=5, timer=time.thread_time)) / 200 * 1e6
    push_us = statistics.median(times[True] + times[False])
    size = sum(v.size for v in params.values())
    print(f"\nmicro ({cfg.model.name}, {size} parameters, {args.workers} workers):")
    print(f"  record_applied {record_ns:.0f} ns vs count alone {count_ns:.0f} ns: recording adds {record_ns - count_ns:.0f} ns a push")
    print(f"  one push applied by the shard (validate + SGD, in process, thread CPU): median {push_us:.1f} us "
          f"(recording on {statistics.median(times[True]):.1f}, off {statistics.median(times[False]):.1f})")
    print(f"  recording / push apply = {(record_ns - count_ns) / 1e3 / push_us * 100:.3f}%")
    print(f"  one Stats read (the chief polls 5 per second): {stats_us:.1f} us "
          f"= {stats_us * 5 / 1e4:.4f}% of one core")
    round_trips(cfg, params, grads, args)


def round_trips(cfg, params, grads, args) -> None:
    """Push-pull round trips through a real gRPC shard in this process, recording switched on and
    off every block of calls: load drift hits both alike, so small differences show."""
    from asyncps.ps import counters
    from asyncps.ps.server import ShardServer
    from asyncps.ps_client import PSClient
    from asyncps.worker.variables import placement_for

    cfg.cluster.ps = 1
    server = ShardServer(cfg, 0)
    port = server.start()
    client = PSClient([f"127.0.0.1:{port}"], placement_for(params, 1), cfg)
    client.init(params)
    client.register(0)
    _, versions = client.pull()
    times: dict[bool, list[float]] = {True: [], False: []}
    seq = 0
    try:
        for block in range(2 * args.blocks):
            on = block % 2 == 0
            counters.set_recording(on)
            started = time.process_time()  # CPU of client + server threads (all in this process)
            for _ in range(100):
                _, _, versions = client.push_pull(grads, versions, 0, seq)
                seq += 1
            times[on].append((time.process_time() - started) / 100 * 1e6)
    finally:
        counters.set_recording(True)
        client.close()
        server.stop(0)
    on_us, off_us = statistics.median(times[True]), statistics.median(times[False])
    paired = statistics.median(a / b for a, b in zip(times[True], times[False]))
    print(f"  gRPC push_pull round trip, CPU of client + shard ({args.blocks} x 100 calls each way, interleaved): on {on_us:.1f} us, "
          f"off {off_us:.1f} us; median paired on/off = {paired:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_softmax.yaml")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=30, help="micro: blocks of 100 round trips per setting")
    parser.add_argument("--skip-cluster", action="store_true", help="only the micro-benchmark")
    args = parser.parse_args()
    micro(args)
    if not args.skip_cluster:
        cluster_overhead(args)


if __name__ == "__main__":
    main()
