"""report.json of a cluster run: the final metrics, the target, throughput and staleness.

Staleness comes from the shards' own counters (exact, one entry per applied push per shard):
`staleness` merges every shard, so its count is pushes x shards; `staleness_per_shard` and
`staleness_per_worker` break it down. `pull_to_push_ms` is the workers' time from a pull to the
push of its gradient (chief/telemetry.py). `failures` lists every process death the chiefs of this
run saw (docs/failures.md), `checkpoints` the checkpoints taken and their pause times.
`transport` says which data plane the workers used (`transport_section`).
"""
from __future__ import annotations

from asyncps.histogram import merge_histograms, summarize
from asyncps.runs import small_variables


def histogram_of(counts) -> dict[int, int]:
    """A shard's bucket list (index = staleness) as {staleness: count}."""
    return {s: int(c) for s, c in enumerate(counts) if c}


def merged_histogram(stats) -> dict[int, int]:
    """Every shard's staleness histogram added together."""
    return merge_histograms(*(histogram_of(s.histogram) for s in stats))


def staleness_section(stats) -> dict:
    """Overall, per-shard and per-worker staleness summaries from every shard's StatsReply."""
    per_shard = {str(s.shard): summarize(histogram_of(s.histogram)) for s in stats}
    workers: dict[int, list] = {}
    for s in stats:
        for w in s.workers:
            workers.setdefault(w.worker, []).append(w)
    per_worker = {}
    for index, rows in sorted(workers.items()):
        summary = summarize(merge_histograms(*(histogram_of(w.histogram) for w in rows)))
        summary["max"] = max(w.staleness_max for w in rows)
        per_worker[str(index)] = {**summary, **controlled_ages(rows), "dropped": sum(w.dropped for w in rows)}
    overall = summarize(merge_histograms(*(histogram_of(s.histogram) for s in stats)))
    overall["max"] = max((w.staleness_max for rows in workers.values() for w in rows), default=0)
    overall.update(controlled_ages([w for rows in workers.values() for w in rows]))
    if any(s.history_depth for s in stats):
        overall["history"] = {"depth": max(s.history_depth for s in stats), "bytes": [s.history_bytes for s in stats]}
    return {"staleness": overall, "staleness_per_shard": per_shard, "staleness_per_worker": per_worker}


def controlled_ages(rows) -> dict:
    """Controlled staleness (ps/history.py), over WorkerStats `rows`: `served` (the age each
    applied push was computed at), `requested` (the worker's draws) and `clamped`; {} otherwise."""
    if not any(w.requested_age_histogram for w in rows):
        return {}
    merged = {key: summarize(merge_histograms(*(histogram_of(getattr(w, key + "_age_histogram")) for w in rows)))
              for key in ("served", "requested")}
    return {**merged, "clamped": sum(w.clamped for w in rows)}


def with_distribution_mean(section: dict, cfg) -> dict:
    """Controlled staleness: the configured distribution's mean next to the draws, as `train` has it."""
    if cfg.staleness.controlled:
        from asyncps.worker.delays import StalenessSampler

        section["staleness"]["distribution_mean"] = StalenessSampler(cfg.staleness, cfg.seed).mean
    return section


def push_counters(stats) -> dict:
    """Applied, dropped, rejected, duplicate and reapplied pushes, summed over shards and workers
    (`reapplied`: pushes applied with a sequence number not above one already applied, in the
    shard's history since its last restore: a push applied twice; always 0)."""
    fields = ("applied", "dropped", "rejected", "duplicates", "reapplied")
    totals = {f: sum(getattr(w, f) for s in stats for w in s.workers) for f in fields}
    totals["rejected"] += sum(s.rejected_unknown for s in stats)
    return totals


def pushes_per_worker(stats) -> dict:
    """{worker: applied, dropped, rejected, duplicates, reapplied} summed over the shards."""
    fields = ("applied", "dropped", "rejected", "duplicates", "reapplied")
    out: dict[str, dict] = {}
    for s in stats:
        for w in s.workers:
            row = out.setdefault(str(w.worker), dict.fromkeys(fields, 0))
            for f in fields:
                row[f] += getattr(w, f)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def cluster_report(run, final: dict, stats, params: dict, seconds: float) -> dict:
    """The report of a finished ChiefRun."""
    cfg = run.cfg
    steps = min(s.version for s in stats)
    c = cfg.cluster
    examples = steps * cfg.train.batch_size * (c.workers - c.backup_workers if c.mode == "sync" else 1)
    return {
        "run_dir": str(run.run_dir),
        "kind": "cluster",
        "config": cfg.to_dict(),
        "final": final,
        "target": run.target.as_dict(),
        "steps": steps,
        "requested_steps": cfg.train.max_steps,
        "seconds": seconds,
        "versions": [s.version for s in stats],
        "throughput": {
            "steps_per_second": steps / seconds if seconds else 0.0,
            "examples_per_second": examples / seconds if seconds else 0.0,
        },
        **with_distribution_mean(staleness_section(stats), cfg),
        "pushes": push_counters(stats),
        "pull_to_push_ms": run.telemetry.pull_to_push_summary() if hasattr(run, "telemetry") else None,
        "pushes_per_shard": {str(s.shard): push_counters([s]) for s in stats},
        "pushes_per_worker": pushes_per_worker(stats),
        # ssp: the largest clock gap between the fastest and the slowest worker seen on any shard
        "max_clock_gap": max((s.max_clock_gap for s in stats), default=0),
        "startup_seconds": getattr(run, "startup_seconds", None),
        "membership": {"joins": run.membership.joins, "deaths": run.membership.deaths, "exits": run.membership.exits,
                       "events": run.events},
        "failures": run.failures,
        "resumed_from": run.resumed_from,
        "checkpoints": run.checkpoints.summary(),
        "transport": transport_section(stats, cfg),
        **tables_section(stats),
        **reference_section(run),
        "variables": small_variables(params),
    }


def transport_section(stats, cfg) -> dict:
    """Which data plane the run used, from the shards' own count of shared-memory segments at
    the end (ps/shm_transport.py: one per worker that proved it shares the shard's host; a
    worker that fell back to gRPC has none). `used`: "shm" when every shard holds a segment for
    every worker, "grpc" when none holds any, "mixed" otherwise (say, a compose run where only
    some containers share /dev/shm). `pushes`: the pushes the shards answered, by the path their
    gradients took (StatsReply.shm_pushes, grpc_pushes)."""
    segments = {str(s.shard): int(s.shm_segments) for s in stats}
    workers = cfg.cluster.workers
    if segments and all(n >= workers for n in segments.values()):
        used = "shm"
    elif not any(segments.values()):
        used = "grpc"
    else:
        used = "mixed"
    return {
        "configured": cfg.cluster.transport,
        "used": used,
        "workers": workers,
        "shm_segments_per_shard": segments,
        "shm_bytes_per_shard": {str(s.shard): int(s.shm_bytes) for s in stats},
        # how the pushes' gradients travelled, all shards together: a worker holding a segment
        # still pushes over gRPC what does not fit it
        "pushes": {"shm": sum(int(s.shm_pushes) for s in stats), "grpc": sum(int(s.grpc_pushes) for s in stats)},
    }


def reference_section(run) -> dict:
    """report.json's `reference`, as `asyncps train` writes it: the data's own model on the test
    set the chief evaluates on (click_logs: the planted model, the best achievable); {} for data
    without one."""
    reference = getattr(getattr(run, "data", None), "reference", None)
    return {"reference": dict(reference)} if reference else {}


def row_histograms(stats) -> dict[str, dict[int, dict[int, int]]]:
    """{table: {frequency bucket: {staleness: row updates}}}, every shard's TableStats added."""
    out: dict[str, dict[int, dict[int, int]]] = {}
    for s in stats:
        for t in getattr(s, "tables", ()):
            buckets = out.setdefault(t.name, {})
            for b in t.staleness:
                buckets[b.bucket] = merge_histograms(buckets.get(b.bucket, {}), histogram_of(b.histogram))
    return out


def bucket_label(bucket: int) -> str:
    """The row-update counts of frequency bucket k: 2^k..2^(k+1)-1 (bucket 0: 0-1)."""
    return "0-1" if bucket == 0 else f"{1 << bucket}-{(1 << (bucket + 1)) - 1}" if bucket < 15 else f"{1 << bucket}+"


def row_staleness_means(stats) -> dict:
    """{table: {bucket label: mean per-row staleness}} (cumulative): for metrics.jsonl's eval rows."""
    return {name: {bucket_label(b): round(summarize(h)["mean"], 3) for b, h in sorted(buckets.items())}
            for name, buckets in row_histograms(stats).items()}


def tables_section(stats) -> dict:
    """report.json's `tables`: per id-keyed table, rows, bytes per shard, evictions, and the
    per-row staleness histogram by row-frequency bucket, with the hottest bucket's mean next to
    the coldest's ({} for a model without tables)."""
    by_name: dict[str, list] = {}
    for s in stats:
        for t in getattr(s, "tables", ()):
            by_name.setdefault(t.name, []).append((s.shard, t))
    out = {}
    histograms = row_histograms(stats)
    for name, parts in by_name.items():
        buckets = {bucket_label(b): summarize(h) for b, h in sorted(histograms.get(name, {}).items())}
        hot_cold = {}
        if buckets:
            coldest, hottest = next(iter(buckets)), list(buckets)[-1]
            hot_cold = {"cold_bucket": coldest, "cold_mean": buckets[coldest]["mean"], "hot_bucket": hottest,
                        "hot_mean": buckets[hottest]["mean"]}
        hot_ids = sorted(((u, i) for _, t in parts for i, u in zip(t.hot_ids, t.hot_updates)), reverse=True)[:10]
        out[name] = {
            "rows": sum(t.rows for _, t in parts),
            "rows_per_shard": {str(shard): t.rows for shard, t in parts},
            "bytes_per_shard": {str(shard): t.bytes for shard, t in parts},
            "created": sum(t.created for _, t in parts),
            "evicted": sum(t.evicted for _, t in parts),
            "row_updates": sum(t.updates for _, t in parts),
            "row_staleness": summarize(merge_histograms(*histograms.get(name, {}).values())),
            "row_staleness_by_frequency": buckets,
            "hot_vs_cold": hot_cold,
            "hottest_ids": [{"id": int(i), "updates": int(u)} for u, i in hot_ids],
        }
    return {"tables": out} if out else {}
