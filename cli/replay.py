"""`asyncps replay RUN_DIR [--without-staleness]`: recompute a cluster run in one process.

Reads the run's update log (RUN_DIR/replay/), replays every shard's pushes in their logged
order with gradients recomputed on exactly the weights each worker read, and compares the result
with the run's final weights (params.npz): exit 0 when they are bit-identical, 1 when not.
Writes RUN_DIR/replay/params_replay.npz and replay.json.

`--without-staleness` replays the same gradients (batches, dropout generators) one at a time on
the current weights, as a staleness-0 counterfactual: RUN_DIR/replay/params_without_staleness.npz
and without_staleness.json, with the test metrics of both and how far the weights moved.

Supported: cluster.mode async, ssp and sync, prefetch, controlled staleness, compression,
frozen variables, sparse gradients, dropout, graph mode, every optimizer, schedule and staleness
policy (dropped pushes included). Refused with one line: runs without an update log (`asyncps
train`, cluster.update_log: false), runs in which a shard was restored from a checkpoint (a
restart, --resume).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from asyncps.atomic import atomic_write_json


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("run_dir", help="the run directory of an `asyncps launch` run")
    parser.add_argument("--without-staleness", action="store_true",
                        help="replay the same batches one at a time on the current weights (staleness 0)")


def run(args: argparse.Namespace) -> int:
    from asyncps.cli import replayer
    from asyncps.runs import PARAMS_FILE, load_params, save_params

    _one_blas_thread()
    run_log = replayer.load_run(args.run_dir)
    run_dir = run_log.run_dir
    if not (run_dir / PARAMS_FILE).is_file():
        raise replayer.ReplayError(f"{run_dir}: no {PARAMS_FILE} (the run did not finish)")
    recorded = load_params(run_dir / PARAMS_FILE)
    started = time.perf_counter()
    if args.without_staleness:
        out, name = replayer.replay_without_staleness(run_log), "without_staleness"
    else:
        out, name = replayer.replay(run_log), "replay"
    seconds = time.perf_counter() - started
    save_params(run_dir / "replay" / f"params_{name}.npz", out.params)
    summary = _summary(run_log, out, recorded, seconds)
    atomic_write_json(run_dir / "replay" / f"{name}.json", summary)
    return _print(summary, name)


def _summary(run_log, out, recorded: dict, seconds: float) -> dict:
    """Counts, staleness, test metrics and the difference to the run's final weights."""
    model, data = _model_and_data(run_log.cfg)
    identical = sorted(out.params) == sorted(recorded) and all(
        np.array_equal(out.params[n], recorded[n]) for n in recorded)
    diff = {n: float(np.max(np.abs(out.params[n].astype(np.float64) - recorded[n]))) for n in recorded if n in out.params}
    hist = dict(sorted(out.staleness.items()))
    total = sum(hist.values())
    return {
        "identical": identical,
        "max_abs_diff": diff,
        "pushes": out.pushes,
        "gradients": out.gradients,
        "seconds": round(seconds, 3),
        "max_versions_kept": out.max_history,
        "staleness": {"histogram": hist, "mean": sum(s * n for s, n in hist.items()) / total if total else 0.0},
        "metrics": model.evaluate(out.params, data.x_test, data.y_test),
        "run_metrics": model.evaluate(recorded, data.x_test, data.y_test),
    }


def _model_and_data(cfg):
    from asyncps.worker.data import load_dataset
    from asyncps.worker.models import build_model

    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    return build_model(cfg.model, data.meta), data


def _print(summary: dict, name: str) -> int:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    run_metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["run_metrics"].items())
    print(f"asyncps replay: {summary['gradients']} gradients, {summary['pushes']} pushes in {summary['seconds']:.1f} s; "
          f"staleness mean {summary['staleness']['mean']:.2f}")
    print(f"  replayed weights: {metrics}; the run's: {run_metrics}")
    worst = max(summary["max_abs_diff"].values(), default=0.0)
    if name == "without_staleness":
        print(f"  without staleness: weights differ from the run's by up to {worst:.3g}")
        return 0
    if summary["identical"]:
        print(f"  bit-identical to the run's final weights ({len(summary['max_abs_diff'])} variables)")
        return 0
    print(f"  NOT identical to the run's final weights: max |diff| {worst:.3g}")
    return 1


def _one_blas_thread() -> None:
    """The workers computed with one BLAS thread; so does the replay (same summation order)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:
        from asyncps.worker.step import limit_blas_threads

        limit_blas_threads(1)
