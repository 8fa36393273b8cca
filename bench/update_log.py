"""What the update log (asyncps replay) costs a shard: pushes/s of `Shard.push` with and without it.

    python bench/update_log.py [--pushes 3000] [--reps 5] [--model softmax|mlp]

In one process, no gRPC: the shard's own work per push (validation, the update under the lock,
and the log record) is all that is timed, so the log's share is as large as it can be. Both
variants alternate over `--reps` rounds on fresh shards; the best round of each is reported
with the difference in microseconds per push. A cluster pays the same absolute cost on top of
the transport (about 200-400 us per push on loopback, docs/performance.md).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from asyncps.config import from_dict  # noqa: E402
from asyncps.ps.shard import Shard  # noqa: E402
from asyncps.update_log import ShardLog  # noqa: E402

MODELS = {
    "softmax": {"softmax.w": (784, 10), "softmax.b": (10,)},
    "mlp": {"w1": (784, 256), "b1": (256,), "w2": (256, 256), "b2": (256,), "w3": (256, 10), "b3": (10,)},
}


def one_round(shapes: dict, pushes: int, log_path: Path | None) -> float:
    """Pushes per second of `pushes` pushes from 2 alternating workers."""
    cfg = from_dict({"optimizer": {"name": "sgd", "learning_rate": 1e-6}, "cluster": {"workers": 2}})
    log = ShardLog(log_path, 0, "async") if log_path else None
    shard = Shard(cfg, 0, update_log=log)
    rng = np.random.default_rng(0)
    shard.init({n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})
    grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    for w in (0, 1):
        shard.register_worker(w)
    started = time.perf_counter()
    for i in range(pushes):
        shard.push(i % 2, i // 2, max(0, shard.version - 1), grads)
    seconds = time.perf_counter() - started
    if log:
        log.close()
    return pushes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", choices=sorted(MODELS), default="softmax")
    args = parser.parse_args()
    shapes = MODELS[args.model]
    best = {"without log": 0.0, "with log": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            best["without log"] = max(best["without log"], one_round(shapes, args.pushes, None))
            best["with log"] = max(best["with log"], one_round(shapes, args.pushes, Path(tmp) / f"ps{rep}.log"))
    for name, rate in best.items():
        print(f"{args.model:8s} {name:12s} {rate:9.0f} pushes/s  {1e6 / rate:7.1f} us/push")
    print(f"log cost: {1e6 / best['with log'] - 1e6 / best['without log']:+.2f} us/push "
          f"({100 * (best['without log'] / best['with log'] - 1):+.1f}% of the shard's own time)")


if __name__ == "__main__":
    main()
