"""`asyncps train CONFIG`: training in one process, the staleness-0 baseline of every study.

The same YAML drives a cluster run; here the worker's gradient step and the shard's optimizer run
in one loop with no network, so every gradient is computed on the newest weights.

Controlled staleness (``staleness.controlled: true``) is the fast study mode: each step draws r
from ``staleness.distribution`` (seeded RNG), computes the gradient on the weights of exactly
r versions ago (kept in a ring buffer of the last s_max versions) and applies it to the current
weights, through ``optimizer.staleness_policy`` like a shard would. Before step r there is no
version t - r: the gradient then uses version 0, and the staleness recorded is t, not r.
`asyncps launch` runs the same mode on the shards (``asyncps.ps.history``); its worker 0 draws
this very sequence of r.

``staleness.simulate`` (an event simulation of an M-worker cluster) and ``staleness.workers: W``
(W workers per clock) run through the same loop with a stepper from ``asyncps.cli.simulate``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque

import numpy as np

from asyncps.cli.common_args import add_config_arguments, config_from_args
from asyncps.cli.data import fetch_before_run
from asyncps.cli.id_tables import make_id_tables
from asyncps.cli.summary import summary_lines
from asyncps.config import Config
from asyncps.histogram import summarize
from asyncps.cli.preflight import preflight
from asyncps.runs import (PARAMS_FILE, MetricsLog, Progress, TargetTracker, resolve_run_dir, save_params,
                          small_variables, write_report)
from asyncps.atomic import atomic_write_bytes

import yaml


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    preflight(cfg)  # a user's model.name / data.name (module:attr) before any download
    fetch_before_run(cfg.data, lambda m: print(f"asyncps train: {m}", file=sys.stderr, flush=True))
    report = train(cfg)
    for line in summary_lines(report):  # the planted model's line too, where the data has one
        print(line)
    return 0


def train(cfg: Config) -> dict:
    """Train in one process, writing metrics.jsonl and report.json; returns the report."""
    from asyncps.ps.optim import make_optimizer, make_schedule
    from asyncps.worker.data import BatchStream, load_dataset
    from asyncps.worker.models import build_model
    from asyncps.worker.step import GradientComputer
    from asyncps.worker.variables import trainable_names

    run_dir = resolve_run_dir(cfg)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    data = load_dataset(cfg.data, context=cfg.model.context, seed=cfg.seed)
    model = build_model(cfg.model, data.meta)
    rng = np.random.default_rng(cfg.seed)
    params = model.init_params(rng)
    trainable = trainable_names(params, cfg.train.frozen)
    optimizer, schedule = make_optimizer(cfg.optimizer), make_schedule(cfg.optimizer)
    slots = {n: optimizer.init_slots(params[n]) for n in trainable}
    tables = make_id_tables(cfg, model)  # id-keyed embedding tables (model.name ctr), rows per batch
    compute = GradientComputer(model, trainable + ([tables.name] if tables else []), cfg.train.graph_mode)
    stream = iter(BatchStream(len(data.x_train), cfg.train.batch_size, 0, 1, cfg.seed))
    from asyncps.cli.simulate import make_stepper  # staleness.simulate, or W workers per clock
    sim = make_stepper(cfg, data, compute, optimizer, schedule, params, slots, trainable)
    stale = ControlledStaleness(cfg, params, trainable) if cfg.staleness.controlled and sim is None else None
    one_step = step_function(data, compute, optimizer, schedule, params, slots, rng, tables, sim, stale)

    log = MetricsLog(run_dir / "metrics.jsonl")
    progress = Progress(cfg.train.max_steps, every=cfg.train.log_every)
    tracker = TargetTracker(cfg.train.target)
    start = time.perf_counter()
    train_seconds = 0.0
    step = 0
    try:
        while step < cfg.train.max_steps:
            if cfg.train.max_seconds is not None and time.perf_counter() - start > cfg.train.max_seconds:
                break
            t0 = time.perf_counter()
            indices, _batch_id = next(stream)  # drawn for every kind of step (a simulated cluster too)
            loss = one_step(step, indices)
            step += 1
            train_seconds += time.perf_counter() - t0
            if step % cfg.train.log_every == 0:
                log.write("train", step, loss=float(loss))
                progress.update(step, loss=float(loss))
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                metrics = model.evaluate({**params, **(tables.sources() if tables else {})}, data.x_test, data.y_test)
                log.write("eval", step, **metrics)
                if tracker.observe(step, time.perf_counter() - start, metrics) and cfg.train.target.stop:
                    break
    finally:
        progress.close()
    final = model.evaluate({**params, **(tables.sources() if tables else {})}, data.x_test, data.y_test)
    elapsed = time.perf_counter() - start
    tracker.observe(step, elapsed, final)
    log.write("final", step, **final)
    log.close()
    report = _report(cfg, run_dir, step, elapsed, train_seconds, final, tracker, trainable, params, data,
                     staleness=(sim.summary() if sim is not None else stale.summary() if stale is not None
                                else summarize({0: step})), tables=tables)
    save_params(run_dir / PARAMS_FILE, params)
    write_report(run_dir, report)
    return report


def step_function(data, compute, optimizer, schedule, params, slots, rng, tables, sim, stale):
    """`train`'s step for the run's kind, chosen once: (step, batch indices) -> loss. Id-keyed
    tables, a simulated cluster (staleness.simulate), controlled staleness, or plain SGD-style."""
    x, y = data.x_train, data.y_train

    def with_tables(step, indices):
        loss, grads = tables.step(compute, params, x[indices], y[indices], rng, schedule(step))
        apply_gradients(optimizer, params, slots, grads, schedule(step), step)
        return loss

    def simulated(step, indices):  # the simulated cluster draws its own workers' batches
        return sim.step(params, step)

    def controlled(step, indices):
        read, r = stale.read(params)
        loss, grads = compute(read, x[indices], y[indices], rng)
        stale.apply(optimizer, params, slots, grads, read, r, schedule(step), step)
        return loss

    def plain(step, indices):
        loss, grads = compute(params, x[indices], y[indices], rng)
        apply_gradients(optimizer, params, slots, grads, schedule(step), step)
        return loss

    if tables is not None:
        return with_tables
    if sim is not None:
        return simulated
    return plain if stale is None else controlled


def _report(cfg, run_dir, step, elapsed, train_seconds, final, tracker, trainable, params, data, staleness,
            tables) -> dict:
    """report.json of a single-process run."""
    return {
        "run_dir": str(run_dir),
        "kind": "single_process",
        "config": cfg.to_dict(),
        "final": final,
        "target": tracker.as_dict(),
        "steps": step,
        "requested_steps": cfg.train.max_steps,
        "seconds": elapsed,
        "throughput": {
            "steps_per_second": step / train_seconds if train_seconds else 0.0,
            "examples_per_second": step * cfg.train.batch_size / train_seconds if train_seconds else 0.0,
        },
        "staleness": staleness,
        "trainable": trainable,
        **({"tables": tables.report()} if tables else {}),
        **({"reference": data.reference} if data.reference else {}),
        "variables": small_variables(params),
    }


def apply_gradients(optimizer, params, slots, grads, lr: float, step: int) -> None:
    """One optimizer step on every variable that has a gradient (sparse rows stay sparse)."""
    for name, grad in grads.items():
        if hasattr(grad, "rows"):
            optimizer.apply_sparse(params[name], grad.rows, grad.values, slots[name], lr, step)
        else:
            optimizer.apply_dense(params[name], grad, slots[name], lr, step)


class ControlledStaleness:
    """Gradients on weights exactly r versions old (see the module docstring).

    `read` draws r and returns the weights of version t - r (the live dict when r = 0); `apply`
    runs the staleness policy and the optimizer on the current weights, then remembers the
    version it leaves for later reads. Only trainable variables are copied: the others never
    change, so every version shares them.
    """

    def __init__(self, cfg: Config, params: dict, trainable: list[str]):
        from asyncps.ps.optim import make_staleness_policy
        from asyncps.worker.delays import StalenessSampler

        self.sampler = StalenessSampler(cfg.staleness, cfg.seed)
        self.trainable = list(trainable)
        self.policy = make_staleness_policy(cfg.optimizer.staleness_policy)
        self.policy_state = {n: self.policy.init_state(params[n]) for n in self.trainable}
        self.past: deque[dict] = deque(maxlen=self.sampler.s_max)  # versions t - s_max .. t - 1
        self.hist: dict[int, int] = {}
        self.requested: dict[int, int] = {}
        self.dropped = 0
        self.clamped = 0  # reads served fewer versions back than drawn (before step r)

    def read(self, params: dict) -> tuple[dict, int]:
        want = self.sampler.draw()
        self.requested[want] = self.requested.get(want, 0) + 1
        r = min(want, len(self.past))
        self.hist[r] = self.hist.get(r, 0) + 1
        self.clamped += r < want
        if r == 0:
            return params, 0
        return {**params, **self.past[-r]}, r

    def apply(self, optimizer, params, slots, grads, read, r: int, lr: float, step: int) -> bool:
        """The update of one gradient; False when the policy dropped all of it."""
        if self.sampler.s_max:
            self.past.append({n: params[n].copy() for n in self.trainable})
        applied = not grads
        for name, grad in grads.items():
            sparse = hasattr(grad, "rows")
            rows, g = (grad.rows, grad.values) if sparse else (None, grad)
            adjusted = self.policy.adjust(g, r, params[name], read[name], self.policy_state[name], rows)
            if adjusted.grad is None:
                self.dropped += 1
                continue
            applied = True
            rate = lr * adjusted.lr_scale
            if sparse:
                optimizer.apply_sparse(params[name], rows, adjusted.grad, slots[name], rate, step)
            else:
                optimizer.apply_dense(params[name], adjusted.grad, slots[name], rate, step)
        return applied

    def summary(self) -> dict:
        """The staleness section of report.json: the staleness each gradient really had."""
        out = summarize(self.hist)
        out["served"] = summarize(self.hist)  # the same key as a cluster's report (there != histogram)
        out["requested"] = summarize(self.requested)
        out["clamped"] = self.clamped
        out["distribution_mean"] = self.sampler.mean
        out["dropped"] = self.dropped
        return out
