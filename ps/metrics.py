"""A shard's Prometheus metrics, built at scrape time from `Shard.stats()`: nothing is added to
the push path. Names follow Prometheus conventions (README, "Telemetry"):

    asyncps_ps_version{shard}                       updates applied (gauge: a restore moves it)
    asyncps_ps_pushes_total{shard,result}           result = applied | dropped | rejected | duplicate
    asyncps_ps_push_staleness{shard}                histogram of applied pushes' staleness (versions),
                                                    buckets 0, 1, 2, 4, 8, 16, 32, 64, +Inf
    asyncps_ps_sync_rounds_total{shard}             sync rounds applied
    asyncps_ps_workers{shard}                       registered, not retired workers
    asyncps_ps_paused{shard}                        1 while paused (checkpoint)
    asyncps_ps_refused_calls_total{shard,code}      calls the shard's server refused before any
                                                    handler ran: code = UNAUTHENTICATED (job token)
                                                    | PERMISSION_DENIED (certificate role, mTLS)
"""
from __future__ import annotations

from asyncps.telemetry import cumulative_buckets


def shard_families(stats: dict):
    """Prometheus metric families of one shard's stats dict (as `Shard.stats` returns it)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    shard = str(stats["shard"])
    workers = stats["workers"]
    version = GaugeMetricFamily("asyncps_ps_version", "Updates applied by the shard.", labels=["shard"])
    version.add_metric([shard], stats["version"])
    pushes = CounterMetricFamily("asyncps_ps_pushes", "Pushes received, by what the shard did with them.",
                                 labels=["shard", "result"])
    rejected = sum(w["rejected"] for w in workers) + stats["rejected_unknown"]
    for result, n in (("applied", sum(w["applied"] for w in workers)), ("dropped", sum(w["dropped"] for w in workers)),
                      ("rejected", rejected), ("duplicate", sum(w["duplicates"] for w in workers))):
        pushes.add_metric([shard, result], n)
    staleness = HistogramMetricFamily("asyncps_ps_push_staleness",
                                      "Staleness of applied pushes (shard versions between read and apply).",
                                      labels=["shard"])
    hist = {s: n for s, n in enumerate(stats["histogram"]) if n}
    staleness.add_metric([shard], cumulative_buckets(hist), sum_value=sum(w["staleness_sum"] for w in workers))
    rounds = CounterMetricFamily("asyncps_ps_sync_rounds", "Sync rounds applied.", labels=["shard"])
    rounds.add_metric([shard], stats["rounds"])
    active = GaugeMetricFamily("asyncps_ps_workers", "Registered workers not retired.", labels=["shard"])
    active.add_metric([shard], sum(1 for w in workers if w["active"]))
    paused = GaugeMetricFamily("asyncps_ps_paused", "1 while the shard is paused.", labels=["shard"])
    paused.add_metric([shard], 1 if stats["paused"] else 0)
    return [version, pushes, staleness, rounds, active, paused]


def refusal_families(refusals, shard: int):
    """The shard server's refused calls per code (`asyncps.protos.security.Refusals`)."""
    from asyncps.protos.security import refusal_family

    return [refusal_family(refusals, "asyncps_ps_refused_calls",
                           "Calls refused before any handler ran (job token, certificate role), by code.",
                           {"shard": str(shard)})]
