"""The chief's telemetry: periodic `telemetry` rows in metrics.jsonl, TensorBoard event files in
the run directory, and the chief's Prometheus /metrics.

A `telemetry` row (every `telemetry.every_seconds`, and one at the end) covers the interval since
the previous row: global steps and steps/s, pushes by result, the staleness of the pushes applied
in the interval (merged, per shard, per worker: differences of the shards' exact cumulative
histograms, read from the StatsReply the chief polls anyway), and the workers' pull-to-push time
(ReportMetrics windows received in the interval). Nothing here touches a push.
"""
from __future__ import annotations

import time
from pathlib import Path

from asyncps.chief.report import histogram_of, push_counters
from asyncps.histogram import merge_histograms, summarize
from asyncps.telemetry import (
    DurationStats,
    FunctionCollector,
    MetricsServer,
    TensorBoard,
    histogram_delta,
    is_window_key,
    metrics_port,
    window_summary,
)

SUMMARY_KEYS = ("count", "mean", "p50", "p99", "max", "histogram")


def per_shard_histograms(stats) -> dict[str, dict[int, int]]:
    """{shard: cumulative staleness histogram} from the shards' StatsReply messages."""
    return {str(s.shard): histogram_of(s.histogram) for s in stats}


def per_worker_histograms(stats) -> dict[str, dict[int, int]]:
    """{worker: cumulative staleness histogram, merged over the shards}."""
    rows: dict[int, list] = {}
    for s in stats:
        for w in s.workers:
            rows.setdefault(w.worker, []).append(histogram_of(w.histogram))
    return {str(i): merge_histograms(*hists) for i, hists in sorted(rows.items())}


def _summary(hist: dict[int, int]) -> dict:
    s = summarize(hist)
    return {k: (round(s[k], 4) if k == "mean" else s[k]) for k in SUMMARY_KEYS}


class RunTelemetry:
    """What the chief measures of a run besides evaluation (see the module docstring)."""

    def __init__(self, cfg, run_dir: Path, log, notice=print):
        self.cfg, self.log = cfg, log
        self.every = cfg.telemetry.every_seconds
        self.tb = TensorBoard.open(run_dir, notice) if cfg.telemetry.tensorboard else None
        self._last: dict | None = None  # the cumulative state at the previous row
        self._windows: dict[str, DurationStats] = {}  # worker -> pull-to-push since the last row
        self._pull_to_push: dict[str, DurationStats] = {}  # worker -> the whole run
        self._losses: list[float] = []
        self.latest: dict = {}  # the last row, for /metrics
        self.metrics_server: MetricsServer | None = None

    # -- inputs ---------------------------------------------------------------------------------

    def worker_report(self, worker: int, values: dict) -> dict:
        """Takes a worker's ReportMetrics values; returns what its `worker` row keeps (the exact
        figures of its pull-to-push window, without the bucket counts)."""
        window = DurationStats()
        if window.add_window(values):
            self._windows.setdefault(str(worker), DurationStats()).merge(window)
            self._pull_to_push.setdefault(str(worker), DurationStats()).merge(window)
        if "train/loss" in values:
            self._losses.append(float(values["train/loss"]))
        kept = {k: v for k, v in values.items() if not is_window_key(k)}
        return {**kept, **window_summary(values)}

    def evaluation(self, step: int, metrics: dict) -> None:
        if self.tb is not None:
            self.tb.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})

    # -- rows -----------------------------------------------------------------------------------

    def baseline(self, step: int, stats) -> dict:
        """The cumulative state the first row is measured from (the run's start); returns it (the
        next row measures from it)."""
        self._last = {"time": time.monotonic(), "step": step, "shards": per_shard_histograms(stats),
                      "workers": per_worker_histograms(stats), "pushes": push_counters(stats)}
        return self._last

    def due(self, now: float | None = None) -> bool:
        if not self.every:
            return False
        last = self._last["time"] if self._last else None
        return last is None or (now or time.monotonic()) - last >= self.every

    def row(self, step: int, stats, final: bool = False) -> dict:
        """Writes one `telemetry` row (and its TensorBoard summaries) for the interval since the
        previous one; returns the row."""
        last = self._last
        state = self.baseline(step, stats)
        last = last or {**state, "shards": {}, "workers": {}, "pushes": {}}
        seconds = state["time"] - last["time"]
        steps = max(0, step - last["step"])
        shards = {k: histogram_delta(h, last["shards"].get(k)) for k, h in state["shards"].items()}
        workers = {k: histogram_delta(h, last["workers"].get(k)) for k, h in state["workers"].items()}
        windows, self._windows = self._windows, {}
        overall = DurationStats()
        for w in windows.values():
            overall.merge(w)
        values = {
            "interval_seconds": round(seconds, 4),
            "steps": steps,
            "steps_per_second": round(steps / seconds, 3) if seconds > 0 else None,
            "examples_per_second": round(steps * self._examples_per_step() / seconds, 2) if seconds > 0 else None,
            "pushes": {k: max(0, v - last["pushes"].get(k, 0)) for k, v in state["pushes"].items()},
            "staleness": _summary(merge_histograms(*shards.values())),
            "staleness_per_shard": {k: _summary(h) for k, h in shards.items()},
            "staleness_per_worker": {k: _summary(h) for k, h in workers.items()},
            "pull_to_push_ms": overall.summary(),
            "pull_to_push_ms_per_worker": {k: w.summary() for k, w in sorted(windows.items())},
            "final": final,
        }
        if any(getattr(s, "tables", ()) for s in stats):  # id-keyed tables: per-row staleness by row frequency (cumulative)
            from asyncps.chief.report import row_staleness_means

            values["row_staleness"] = row_staleness_means(stats)
        row = self.log.write("telemetry", step, **values)
        self.latest = row
        self._to_tensorboard(step, row, shards)
        return row

    def _examples_per_step(self) -> int:
        c = self.cfg.cluster
        return self.cfg.train.batch_size * (c.workers - c.backup_workers if c.mode == "sync" else 1)

    def _to_tensorboard(self, step: int, row: dict, shards: dict) -> None:
        if self.tb is None:
            return
        st, ptp = row["staleness"], row["pull_to_push_ms"]
        scalars = {"throughput/steps_per_second": row["steps_per_second"],
                   "throughput/examples_per_second": row["examples_per_second"],
                   "ps/staleness_mean": st["mean"] if st["count"] else None,
                   "ps/staleness_p99": st["p99"] if st["count"] else None,
                   "ps/staleness_max": st["max"] if st["count"] else None,
                   "worker/pull_to_push_ms_p50": ptp.get("p50_ms"), "worker/pull_to_push_ms_p99": ptp.get("p99_ms"),
                   "ps/pushes_dropped": row["pushes"].get("dropped")}
        if self._losses:
            scalars["train/loss"] = sum(self._losses) / len(self._losses)
            self._losses = []
        self.tb.scalars(step, scalars)
        self.tb.histogram("ps/staleness", step, merge_histograms(*shards.values()))
        for shard, hist in shards.items():
            self.tb.histogram(f"ps/staleness/shard{shard}", step, hist)
        if row["final"]:
            self.tb.flush()

    def pull_to_push_summary(self) -> dict:
        """report.json: the whole run's pull-to-push time, overall and per worker."""
        overall = DurationStats()
        for w in self._pull_to_push.values():
            overall.merge(w)
        return {"overall": overall.summary(), "per_worker": {k: w.summary() for k, w in sorted(self._pull_to_push.items())}}

    # -- Prometheus -----------------------------------------------------------------------------

    def serve_metrics(self, run, notice=print) -> None:
        """The chief's /metrics on `telemetry.prometheus_port` (0: none)."""
        t = self.cfg.telemetry
        port = metrics_port(t.prometheus_port, "chief", 0, self.cfg.cluster.ps)
        if port:
            self.metrics_server = MetricsServer.start([FunctionCollector(lambda: chief_families(run, self))], port,
                                                      t.prometheus_host, who="chief", notice=notice)
            if self.metrics_server is not None:
                notice(f"chief: metrics on http://{t.prometheus_host}:{self.metrics_server.port}/metrics")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()


def chief_families(run, telemetry: RunTelemetry):
    """The chief's Prometheus metric families (read at scrape time)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

    gauges = [("asyncps_chief_global_step", "Global step (updates applied by every shard).", run.step),
              ("asyncps_chief_workers_alive", "Workers registered and beating.", len(run.membership.alive())),
              ("asyncps_chief_steps_per_second", "Global steps per second over the last telemetry interval.",
               telemetry.latest.get("steps_per_second") or 0.0)]
    out: list[Metric] = []
    for name, doc, value in gauges:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        out.append(family)
    for name, doc, value in (("asyncps_chief_worker_joins", "Worker registrations.", run.membership.joins),
                             ("asyncps_chief_worker_deaths", "Workers declared dead.", run.membership.deaths),
                             ("asyncps_chief_failures", "Process failures recorded.", len(run.failures))):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], value)
        out.append(counter)
    evaluation = GaugeMetricFamily("asyncps_chief_eval", "Latest test-set metric.", labels=["metric"])
    for metric, value in sorted(getattr(run, "last_eval", {}).items()):
        evaluation.add_metric([metric], value)
    out.append(evaluation)
    ptp = GaugeMetricFamily("asyncps_worker_pull_to_push_seconds",
                            "Time from a pull to the push of its gradient, last telemetry interval.",
                            labels=["worker", "quantile"])
    for worker, summary in telemetry.latest.get("pull_to_push_ms_per_worker", {}).items():
        for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
            if key in summary:
                ptp.add_metric([worker, q], summary[key] / 1e3)
    out.append(ptp)
    refusals = getattr(getattr(run, "server", None), "refusals", None)  # the chief's RoleServer
    if refusals is not None:
        out.extend(refusal_families(refusals))
    return out


def refusal_families(refusals):
    """The chief server's refused calls per code (`asyncps.protos.security.Refusals`)."""
    from asyncps.protos.security import refusal_family

    return [refusal_family(refusals, "asyncps_chief_refused_calls",
                           "Calls refused before any handler ran (job token, certificate role), by code.")]
