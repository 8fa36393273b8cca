"""The lines a finished run ends with, the same for `asyncps train` and `asyncps launch`.

Read from report.json, so what the terminal says is what the run recorded: the final metrics
(and which evaluation they are), the target (reached at step N in S s, or NOT reached), the
steps applied against the steps requested, the throughput (and, for a cluster, which data plane
its workers used), the data's own model beside the run's where the data has one (click_logs: the
planted model, `reference` in report.json), and where the run directory and the logs are.
"""
from __future__ import annotations

from pathlib import Path


def summary_lines(report: dict, logs: str | None = None) -> list[str]:
    """What a finished run prints; `logs`: where the per-process logs are (clusters)."""
    lines = [f"run_dir: {report['run_dir']}"]
    final = report.get("final") or {}
    steps, requested = report.get("steps"), report.get("requested_steps")
    at = f" at step {steps}" if steps is not None else ""
    if requested is not None and steps is not None and steps != requested:
        at += f" ({requested} requested)"
    lines.append("final: " + " ".join(f"{k}={_fmt(v)}" for k, v in final.items()) + at
                 + (" (evaluated after the stop at the target)" if stopped_at_target(report) else ""))
    target = report.get("target") or {}
    if target.get("value") is not None:
        head = f"target {target['metric']} {target['value']:g}: "
        if target.get("reached"):
            value = (target.get("metrics") or {}).get(target["metric"])
            lines.append(head + f"reached at step {target['step']} ({target['seconds']:.1f} s)"
                         + (f", {target['metric']}={_fmt(value)} there" if value is not None else ""))
        else:
            lines.append(head + "NOT reached")
    speed = throughput_line(report)
    if speed:
        lines.append(speed)
    if report.get("reference"):
        lines.append(reference_line(report["reference"], final))
    lines += table_lines(report)
    if logs:
        lines.append(f"logs: {logs}")
    return lines


def throughput_line(report: dict) -> str | None:
    """`throughput: R steps/s (N steps in S s)`, then `; transport: ...` for a cluster run; None
    when the report has no throughput (an older report)."""
    rate = (report.get("throughput") or {}).get("steps_per_second")
    steps, seconds = report.get("steps"), report.get("seconds")
    if rate is None or steps is None or seconds is None:
        return None
    line = f"throughput: {rate:.1f} steps/s ({steps} steps in {seconds:.1f} s)"
    transport = report.get("transport")
    return line + f"; transport: {transport_words(transport)}" if transport else line


def transport_words(t: dict) -> str:
    """chief/report.py's `transport` section in words."""
    segments = t.get("shm_segments_per_shard") or {}
    shards = len(segments)
    workers = t.get("workers", 0)
    mib = sum((t.get("shm_bytes_per_shard") or {}).values()) / 2**20
    where = "the shard" if shards == 1 else f"each of {shards} shards"
    if t.get("used") == "shm":
        words = f"shared memory, {workers} of {workers} workers on {where} ({mib:.1f} MiB of segments)"
    elif t.get("used") == "grpc":
        return f"gRPC (cluster.transport {t.get('configured')})"
    else:
        low, high = min(segments.values(), default=0), max(segments.values(), default=0)
        count = f"{low}" if low == high else f"{low}-{high}"
        words = f"mixed: shared memory for {count} of {workers} workers per shard ({mib:.1f} MiB), gRPC for the rest"
    pushes = t.get("pushes") or {}
    if pushes.get("grpc") and t.get("used") == "shm":  # segments held, yet some pushes took gRPC
        words += f"; {pushes['grpc']} of {pushes['grpc'] + pushes.get('shm', 0)} pushes over gRPC"
    return words


def reference_line(reference: dict, final: dict) -> str:
    """The data's own model (click_logs: the planted one, the best achievable) beside this run's."""
    ref = " ".join(f"{k}={v:.4f}" for k, v in reference.items())
    gaps = ", ".join(f"{k} {final[k] - v:+.4f}" for k, v in reference.items() if k in final)
    return f"planted model: {ref} (best achievable); this run: {gaps}"


def table_lines(report: dict) -> list[str]:
    """One line per id-keyed table of a cluster run: rows, and per-row staleness hot vs cold."""
    out = []
    for name, t in (report.get("tables") or {}).items():
        hc = t.get("hot_vs_cold") or {}
        if "rows_per_shard" not in t:
            continue  # `asyncps train`'s table section (one store, no row staleness by shard)
        line = f"table {name}: {t['rows']} rows on {len(t['rows_per_shard'])} shards"
        if hc:
            line += (f"; per-row staleness mean {hc['hot_mean']:.2f} for the hottest rows ({hc['hot_bucket']} updates) "
                     f"vs {hc['cold_mean']:.2f} for the coldest ({hc['cold_bucket']})")
        out.append(line)
    return out


def stopped_at_target(report: dict) -> bool:
    target = report.get("target") or {}
    return bool(target.get("reached")) and bool(((report.get("config") or {}).get("train") or {}).get("target", {}).get("stop"))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def logs_hint(run_dir: str | Path) -> str:
    """`RUN_DIR/*.log` (one log per process) for a cluster run."""
    return str(Path(run_dir) / "*.log")
