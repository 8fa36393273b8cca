"""Load: one shard against 16-64 concurrent pushers on loopback, with an exact accounting.

    python bench/load.py [--pushers 16 32 64] [--seconds 10] [--dim 1024] [--procs 4]
                         [--security none|token|tls|mtls] [--json out.json]

The shard runs as its own OS process (`python -m asyncps.ps.server`, port 0); the pushers are
threads spread over `--procs` processes, each pusher with its own channel and worker index, as
real workers would be. Every pusher sends, for `--seconds`, pushes carrying known gradients:

    w      (dim,)   dense, every element 2**-10
    counts (N, 1)   sparse, row = the pusher's index, value 1

with SGD at learning rate 1, so after the run w must equal -2**-10 * (pushes applied) exactly and
counts[i] = -(pushes of pusher i applied): an update lost or applied twice shows. Every 20th push
is a replay of the previous sequence number (must come back DUPLICATE) and every 50th carries a
NaN (must be rejected with INVALID_ARGUMENT). The accounting, per pusher, on both sides:

    sent = applied + rejected + dropped + duplicates        (client replies == shard's Stats)

Reported per level: pushes/s (replies of every kind), p50/p99 push latency, the shard process's
RSS (start, peak, end), and `lost` = sent - accounted + value mismatches (must be 0).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STEP = 2.0 ** -10
REPLAY_EVERY, NAN_EVERY = 20, 50


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_cfg(n: int, security: dict):
    from asyncps.config import from_dict

    return from_dict({"cluster": {"ps": 1, "workers": n, "rpc_timeout": 30.0, "security": security},
                      "optimizer": {"name": "sgd", "learning_rate": 1.0}})


def placement(n: int, dim: int):
    from asyncps.partition import place

    return place({"w": ((dim,), "float32"), "counts": ((n, 1), "float32")}, 1)


def pusher_process(address, n, dim, security, indices, seconds, start_at, out_queue):
    """Runs one thread per pusher index; puts one result dict per pusher on the queue."""
    import grpc

    from asyncps.sparse import SparseRows
    from asyncps.ps_client import PSClient

    os.environ["ASYNCPS_ROLE"] = "worker"  # mtls: the worker certificate (pushes are data RPCs)
    cfg = make_cfg(n, security)
    results = []

    def run(index):
        client = PSClient([address], placement(n, dim), cfg)
        g: dict[str, np.ndarray | SparseRows] = {
            "w": np.full(dim, STEP, np.float32), "counts": SparseRows(np.array([index]), np.ones((1, 1), np.float32))}
        bad: dict[str, np.ndarray | SparseRows] = {"w": np.full(dim, np.nan, np.float32)}
        r = {"index": index, "sent": 0, "APPLIED": 0, "DUPLICATE": 0, "DROPPED": 0, "ACCUMULATED": 0,
             "rejected": 0, "failed": 0, "errors": {}, "latency": []}
        seq, version = 0, [0]
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        k = 0
        while time.time() < end:
            k += 1
            if k % REPLAY_EVERY == 0 and seq > 0:
                grads, s = g, seq - 1  # a retry of the last push: must be DUPLICATE
            elif k % NAN_EVERY == 0:
                grads, s = bad, seq  # must be rejected; the seq stays free
            else:
                grads, s = g, seq
            t0 = time.perf_counter()
            r["sent"] += 1
            try:
                result = client.push(grads, version, index, s)[0]
            except grpc.RpcError as err:
                r["latency"].append(time.perf_counter() - t0)
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    r["rejected"] += 1
                else:
                    r["failed"] += 1
                    r["errors"][err.code().name] = r["errors"].get(err.code().name, 0) + 1
                continue
            r["latency"].append(time.perf_counter() - t0)
            r[result.result] += 1
            if s == seq:
                seq += 1
            version = [result.version]
        client.close()
        results.append(r)

    threads = [threading.Thread(target=run, args=(i,)) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        out_queue.put(r)


def start_shard(tmp: Path, n: int, security: dict) -> tuple[subprocess.Popen, str]:
    import yaml

    config = tmp / f"shard-{n}.yaml"
    config.write_text(yaml.safe_dump(make_cfg(n, security).to_dict()))
    port_file = tmp / f"shard-{n}.port"
    proc = subprocess.Popen([sys.executable, "-m", "asyncps.ps.server", str(config), "--port", "0",
                             "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    deadline = time.time() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("the shard did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def one_level(n: int, args, tmp: Path, security: dict) -> dict:
    from asyncps.ps_client import PSClient

    proc, address = start_shard(tmp, n, security)
    os.environ["ASYNCPS_ROLE"] = "chief"  # mtls: Init is a control RPC, the chief certificate's (README Security)
    try:
        admin = PSClient([address], placement(n, args.dim), make_cfg(n, security))
        admin.init({"w": np.zeros(args.dim, np.float32), "counts": np.zeros((n, 1), np.float32)})
        for i in range(n):
            admin.register(i)
        rss_start = rss_mib(proc.pid)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        start_at = time.time() + 3.0 + 0.1 * args.procs  # every process connected and waiting
        groups = [list(range(n))[p::args.procs] for p in range(args.procs)]
        procs = [ctx.Process(target=pusher_process, args=(address, n, args.dim, security, g, args.seconds, start_at, queue))
                 for g in groups if g]
        for p in procs:
            p.start()
        peak = rss_start
        results: list[dict] = []  # one per pushing worker
        while len(results) < n:
            try:
                results.append(queue.get(timeout=0.2))
            except Exception:
                pass
            peak = max(peak, rss_mib(proc.pid))
            if all(not p.is_alive() for p in procs) and queue.empty() and len(results) < n:
                raise SystemExit("a pusher process died")
        for p in procs:
            p.join()
        rss_end = rss_mib(proc.pid)
        params, versions = admin.pull()
        stats = {w.worker: w for w in admin.stats()[0].workers}
        admin.stop(grace=1.0)
        admin.close()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    lat = np.concatenate([np.asarray(r["latency"]) for r in results]) * 1e3
    sent = sum(r["sent"] for r in results)
    applied = sum(r["APPLIED"] for r in results)
    mismatches = []
    for r in results:
        s = stats[r["index"]]
        client_side = (r["APPLIED"], r["rejected"], r["DROPPED"], r["DUPLICATE"])
        shard_side = (s.applied, s.rejected, s.dropped, s.duplicates)
        if client_side != shard_side:
            mismatches.append(f"pusher {r['index']}: client {client_side} != shard {shard_side}")
        if params["counts"][r["index"], 0] != -r["APPLIED"]:
            mismatches.append(f"counts[{r['index']}] = {params['counts'][r['index'], 0]}, expected {-r['APPLIED']}")
    if not np.all(params["w"] == np.float32(-STEP * applied)):
        mismatches.append(f"w = {params['w'][:3]}..., expected {-STEP * applied}")
    if versions[0] != applied:
        mismatches.append(f"shard version {versions[0]} != applied {applied}")
    accounted = sum(r["APPLIED"] + r["rejected"] + r["DROPPED"] + r["DUPLICATE"] for r in results)
    failed = sum(r["failed"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "pushers": n, "seconds": args.seconds, "dim": args.dim, "security": args.security,
        "sent": sent, "applied": applied, "rejected": sum(r["rejected"] for r in results),
        "duplicates": sum(r["DUPLICATE"] for r in results), "dropped": sum(r["DROPPED"] for r in results),
        "failed": failed, "errors": errors,
        "pushes_per_s": round(sent / args.seconds, 1), "applied_per_s": round(applied / args.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
        "shard_rss_mib": {"start": round(rss_start, 1), "peak": round(peak, 1), "end": round(rss_end, 1)},
        "lost": sent - accounted + len(mismatches), "mismatches": mismatches[:5],
    }


def security_settings(kind: str, tmp: Path) -> dict:
    if kind == "none":
        return {}
    token = tmp / "token"
    token.write_text("load-bench-token\n")
    settings: dict[str, str | bool] = {"token_file": str(token)}
    if kind in ("tls", "mtls"):
        from asyncps.cli.certs import make_certs

        make_certs(tmp / "certs")
        settings.update({kind: True, "dir": str(tmp / "certs")})
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dim", type=int, default=1024, help="floats in the dense gradient (default 1024: 4 KiB)")
    parser.add_argument("--procs", type=int, default=4, help="pusher processes (threads spread over them)")
    parser.add_argument("--security", choices=["none", "token", "tls", "mtls"], default="none")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        security = security_settings(args.security, tmp)
        for n in args.pushers:
            row = one_level(n, args, tmp, security)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'pushers':>7} {'push/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB start/peak/end':>24} "
          f"{'sent':>7} {'applied':>7} {'rej':>5} {'dup':>5} {'fail':>5} {'lost':>4}")
    for r in rows:
        m = r["shard_rss_mib"]
        print(f"{r['pushers']:>7} {r['pushes_per_s']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7} "
              f"{m['start']:>8}/{m['peak']}/{m['end']:<7} {r['sent']:>7} {r['applied']:>7} {r['rejected']:>5} "
              f"{r['duplicates']:>5} {r['failed']:>5} {r['lost']:>4}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["lost"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
