"""The row-wise data plane of id-keyed tables: step cost and bytes against the vocabulary size.

    python bench/sparse.py                      # vocabularies 10^6, 10^7, 10^8, 2 shards, gRPC
    python bench/sparse.py --transport shm --steps 300 --batch 512

Real shards (ps/server.py ShardServer, on threads of this process) and one client doing what a
cluster worker does for a CTR model (worker/main.py run_with_tables): per step, push the summed
row gradients of its batch's unique ids with the versions read, plus a small dense gradient,
and pull the rows of the next batch's ids in the same push-pull. The batch holds `batch`
examples of `fields` categorical features, each a Zipf(--zipf) rank over the vocabulary hashed
to a 64-bit id (a Criteo-like mix of a few hot and many cold ids). No model math: the figures
are the data plane's. Per vocabulary it prints the median step wall time, the process CPU per
step (client and shards together), the bytes of table rows pushed + pulled per step (the
TableRows fields: ids, versions, values) next to the dense bytes, the unique ids per batch, and
the shards' table memory against the rows touched so far (only touched rows materialise), plus
the pause of a checkpoint-like SnapshotTable of every row. Figures go to docs/sparse.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from asyncps.config import Config  # noqa: E402
from asyncps.hashing import feature_ids  # noqa: E402
from asyncps.partition import place  # noqa: E402
from asyncps.protos import table_rows  # noqa: E402
from asyncps.ps.server import ShardServer  # noqa: E402
from asyncps.ps_client import PSClient, TableGrad  # noqa: E402

TABLE = "bench.embed"


def batches(vocab: int, batch: int, fields: int, zipf: float, seed: int):
    """Endless batches of unique ids (Zipf ranks in [1, vocab] per field, hashed per field)."""
    rng = np.random.default_rng(seed)
    names = [f"f{k}" for k in range(fields)]
    while True:
        ranks = rng.zipf(zipf, size=(batch, fields))
        ranks = np.where(ranks > vocab, rng.integers(1, vocab + 1, size=ranks.shape), ranks)  # the tail, uniform
        ids = np.concatenate([feature_ids(name, ranks[:, k]) for k, name in enumerate(names)])
        yield np.unique(ids)


def run_one(vocab: int, args) -> dict:
    cfg = Config()
    cfg.cluster.ps, cfg.cluster.workers, cfg.cluster.transport = args.shards, 1, args.transport
    cfg.cluster.update_log = False
    cfg.optimizer.name, cfg.optimizer.learning_rate = "adagrad", 0.05
    servers = [ShardServer(cfg, i) for i in range(args.shards)]
    dense = {"hidden.kernel": np.zeros((args.fields * args.dim, 64), np.float32), "hidden.bias": np.zeros(64, np.float32)}
    client = PSClient([f"127.0.0.1:{s.start()}" for s in servers],
                      place({n: (a.shape, a.dtype) for n, a in dense.items()}, args.shards), cfg,
                      tables={TABLE: args.dim})
    try:
        client.init(dense)
        client.register(0)
        stream = batches(vocab, args.batch, args.fields, args.zipf, args.seed)
        ids = next(stream)
        _, versions, rows = client.pull_with_rows({TABLE: ids}, worker=0)
        rng = np.random.default_rng(args.seed)
        grads = {n: rng.standard_normal(a.shape).astype(np.float32) * 1e-3 for n, a in dense.items()}
        walls, cpus, table_bytes, uniques = [], [], [], []
        for step in range(args.warmup + args.steps):
            g = rng.standard_normal((len(ids), args.dim)).astype(np.float32)
            nxt = next(stream)
            table_grads = {TABLE: TableGrad(ids, g, rows[TABLE][1])}
            if step >= args.warmup:  # the bytes the headers carry: pushed rows, ids asked, rows answered
                sent = sum(table_rows.nbytes(m) for m in client._rows.split_grads(table_grads))
                asked = sum(table_rows.nbytes(m) for m in client._rows.split_ids({TABLE: nxt})[0])
                table_bytes.append(sent + asked + len(nxt) * (8 + 8 + 4 * args.dim))
                uniques.append(len(ids))
            w0, c0 = time.perf_counter(), time.process_time()
            _, _, versions, rows = client.push_pull_rows(grads, versions, 0, step, table_grads=table_grads,
                                                         table_ids={TABLE: nxt})
            if step >= args.warmup:
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            ids = nxt
        stats = client.stats()
        rows_touched = sum(s.tables[0].rows for s in stats)
        memory = sum(s.tables[0].bytes for s in stats)
        started = time.perf_counter()  # what a checkpoint streams with the shards paused
        client.pause()
        for i in range(args.shards):
            for _ in client.snapshot_table(i, TABLE)[1]:
                pass
        client.resume()
        snapshot_ms = (time.perf_counter() - started) * 1e3
        dense_bytes = 2 * sum(a.nbytes for a in dense.values())
        return {"vocab": vocab, "wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus),
                "table_kib": statistics.median(table_bytes) / 1024, "dense_kib": dense_bytes / 1024,
                "unique_ids": statistics.median(uniques), "rows": rows_touched, "memory_mib": memory / 2**20,
                "bytes_per_row": memory / max(rows_touched, 1), "snapshot_ms": snapshot_ms,
                "full_table_mib": vocab * args.dim * 4 / 2**20}
    finally:
        client.close()
        for s in servers:
            s.stop(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[10**6, 10**7, 10**8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fields", type=int, default=26)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--transport", choices=["grpc", "shm"], default="grpc")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"# {args.shards} shards ({args.transport}), batch {args.batch} x {args.fields} fields, dim {args.dim}, "
          f"zipf {args.zipf}, {args.steps} steps after {args.warmup} (medians); adagrad", flush=True)
    print(f"{'vocab':>10} {'wall ms':>8} {'cpu ms':>7} {'uniq ids':>8} {'rows KiB':>9} {'dense KiB':>9} "
          f"{'rows held':>9} {'MiB held':>8} {'B/row':>6} {'snap ms':>8} {'dense table MiB':>15}")
    for vocab in args.vocabs:
        r = run_one(vocab, args)
        print(f"{r['vocab']:>10.0e} {r['wall_ms']:>8.2f} {r['cpu_ms']:>7.2f} {r['unique_ids']:>8.0f} "
              f"{r['table_kib']:>9.1f} {r['dense_kib']:>9.1f} {r['rows']:>9} {r['memory_mib']:>8.1f} "
              f"{r['bytes_per_row']:>6.0f} {r['snapshot_ms']:>8.1f} {r['full_table_mib']:>15.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
