"""The grid of a sweep and the tables made from its runs (pure: no processes, no plotting).

Overrides follow Hydra's sweep grammar: ``key=a,b,c`` lists the values of one axis, a plain
``key=v`` is a fixed override of every run. Commas inside brackets, braces or quotes do not split
(``model.hidden=[64],[256,256]`` is an axis of two lists). Two keys are the sweep's own:
``runner`` (``train`` or ``launch``, see `default_runner`) and ``seed`` (the seeds, instead of
``--seeds N``).
"""
from __future__ import annotations

import itertools
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from asyncps.errors import ConfigError

RUNNERS = ("train", "launch")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a value for every axis, and the directory name made from them."""

    name: str
    values: tuple[tuple[str, str], ...]  # (axis key, value as written)

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values if k not in ("runner", "seed")]

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.values).get(key, default)


@dataclass
class Grid:
    fixed: list[str] = field(default_factory=list)  # key=value overrides of every run
    axes: list[tuple[str, list[str]]] = field(default_factory=list)  # (key, values) in order given
    runner: str | None = None  # fixed runner, when given as runner=X
    seeds: list[int] | None = None  # from seed=..., else from --seeds

    def settings(self) -> list[Setting]:
        """The cartesian product of the axes, first axis slowest; one setting `base` if none."""
        if not self.axes:
            return [Setting("base", ())]
        keys = [k for k, _ in self.axes]
        out, seen = [], set()
        for combo in itertools.product(*(vals for _, vals in self.axes)):
            name = setting_name(zip(keys, combo))
            while name in seen:  # two values that clean up to the same name
                name += "_"
            seen.add(name)
            out.append(Setting(name, tuple(zip(keys, combo))))
        return out


def split_values(text: str) -> list[str]:
    """Top-level comma split: ``a,[1,2],{x: 1, y: 2}`` -> ``['a', '[1,2]', '{x: 1, y: 2}']``."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(overrides: list[str]) -> Grid:
    """Fixed overrides, axes, runner and seeds from the command line's key=value words."""
    grid = Grid()
    keys = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value or key=a,b,c")
        if key in keys:
            raise ConfigError(f"override {item!r}: {key} is given twice")
        keys.add(key)
        if key == "run_dir":
            raise ConfigError("run_dir is chosen by the sweep (OUT/<setting>/seed<k>); use --out")
        values = split_values(value)
        if any(v == "" for v in values) and len(values) > 1:
            raise ConfigError(f"override {item!r}: empty value in the list")
        if key == "runner":
            bad = [v for v in values if v not in RUNNERS]
            if bad:
                raise ConfigError(f"runner must be one of {', '.join(RUNNERS)}, got {bad[0]!r}")
        if key == "seed":
            try:
                grid.seeds = [int(v) for v in values]
            except ValueError:
                raise ConfigError(f"seed values must be integers, got {value!r}") from None
            continue
        if len(values) > 1:
            grid.axes.append((key, values))
        elif key == "runner":
            grid.runner = values[0]
        else:
            grid.fixed.append(f"{key}={value}")
    return grid


def setting_name(pairs) -> str:
    """A directory name for a setting: ``key=value`` pairs joined by ``__``, path-safe."""
    words = [f"{key}={value}" for key, value in pairs]
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "", "__".join(words))
    return name or "base"


def default_runner(cfg) -> str:
    """`train` for controlled staleness and the simulation (the single-process study modes), else
    `launch`.

    A single-process run is the staleness-0 baseline: add ``runner=train,launch`` to get it.
    """
    return "train" if cfg.staleness.controlled or cfg.staleness.simulate is not None else "launch"


# ----------------------------------------------------------------------------------------------
# Rows and summaries

STALENESS_KEYS = ("mean", "p50", "p99", "max")


def result_row(report: dict) -> dict:
    """The numbers of one run that results.csv keeps (setting, seed and status added by the caller)."""
    target, tp, st = report.get("target", {}), report.get("throughput", {}), report.get("staleness", {})
    row = {
        "runner": "train" if report.get("kind") == "single_process" else "launch",
        "steps": report.get("steps"),
        "seconds": _round(report.get("seconds")),
        "target_metric": target.get("metric"),
        "target_value": target.get("value"),
        "target_reached": bool(target.get("reached")),
        "steps_to_target": target.get("step") if target.get("reached") else None,
        "seconds_to_target": _round(target.get("seconds")) if target.get("reached") else None,
    }
    for k, v in sorted(report.get("final", {}).items()):
        if isinstance(v, (int, float)):
            row[f"final_{k}"] = _round(v, 6)
    row["steps_per_second"] = _round(tp.get("steps_per_second"))
    row["examples_per_second"] = _round(tp.get("examples_per_second"), 1)
    for k in STALENESS_KEYS:
        row[f"staleness_{k}"] = _round(st.get(k), 4)
    return row


def _round(v, digits: int = 3):
    return None if v is None else round(float(v), digits)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_number(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if math.isinf(v):
        return "> budget"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def spread(values: list[float], digits: int = 3) -> str:
    """``median [min–max]``, unreached values counted as +inf ("> budget")."""
    if not values:
        return "—"
    med = fmt_number(_median(values), digits)
    if len(values) == 1 or min(values) == max(values):
        return med
    return f"{med} [{fmt_number(min(values), digits)}–{fmt_number(max(values), digits)}]"


def is_zero_staleness(rows: list[dict]) -> bool:
    return bool(rows) and all(r.get("status") == "ok" and (r.get("staleness_max") or 0) == 0 for r in rows)


def baselines(settings: list[Setting], rows_of: dict[str, list[dict]]) -> dict[str, str | None]:
    """For each setting, the staleness-0 setting sharing the most axis values with it (or None)."""
    zero = [s for s in settings if is_zero_staleness(rows_of.get(s.name, []))]
    out = {}
    for s in settings:
        mine = set(s.values)
        best = max(zero, key=lambda z: len(mine & set(z.values)), default=None)  # ties: the first
        out[s.name] = best.name if best is not None else None
    return out


def _to_target(rows: list[dict], key: str) -> list[float]:
    return [math.inf if r.get(key) is None else float(r[key]) for r in rows if r.get("status") == "ok"]


def ratio_to_baseline(rows: list[dict], base_rows: list[dict], key: str) -> str:
    """Median over seeds of (this setting's value / the baseline's, same seed); both reached."""
    base = {r["seed"]: r.get(key) for r in base_rows if r.get("status") == "ok"}
    ratios, unreached = [], 0
    for r in rows:
        b = base.get(r["seed"])
        if r.get("status") != "ok" or b is None or b == 0:
            continue
        if r.get(key) is None:
            unreached += 1
            ratios.append(math.inf)
        else:
            ratios.append(float(r[key]) / float(b))
    if not ratios:
        return "—"
    med = _median(ratios)
    return "> budget" if math.isinf(med) else f"{med:.2f}x"


def summary_markdown(settings: list[Setting], rows: list[dict], title: str, command: str) -> str:
    """summary.md: one row per setting, medians and spreads over seeds, ratios to staleness 0."""
    rows_of: dict[str, list[dict]] = {}
    for r in rows:
        rows_of.setdefault(r["setting"], []).append(r)
    base_of = baselines(settings, rows_of)
    metric = next((r["target_metric"] for r in rows if r.get("target_metric")), None) or "accuracy"
    target_value = next((r["target_value"] for r in rows if r.get("target_value") is not None), None)
    final_key = f"final_{metric}"
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Target: {metric} {'>=' if metric == 'accuracy' else '<='} {target_value}" if target_value is not None
        else "Target: none set (train.target.value)",
        "",
        "Steps and seconds to target and the final metric: median [min–max] over seeds; "
        "\"> budget\": not reached within train.max_steps. Ratios: median over seeds of this "
        "setting / the staleness-0 setting of the same seed (marked *baseline*). Staleness: "
        "mean of the per-run means, median of the per-run p99, largest max.",
        "",
        "| setting | seeds | steps to target | seconds to target | final " + metric
        + " | steps/s | staleness mean | p99 | max | steps ratio | seconds ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        rs = rows_of.get(s.name, [])
        ok = [r for r in rs if r.get("status") == "ok"]
        failed = len(rs) - len(ok)
        base = base_of.get(s.name)
        if base == s.name:
            ratio_steps = ratio_secs = "*baseline*"
        elif base is None:
            ratio_steps = ratio_secs = "—"
        else:
            ratio_steps = ratio_to_baseline(ok, rows_of[base], "steps_to_target")
            ratio_secs = ratio_to_baseline(ok, rows_of[base], "seconds_to_target")
        finals = [r[final_key] for r in ok if r.get(final_key) is not None]
        cells = [
            s.name + (f" ({failed} failed)" if failed else ""),
            str(len(ok)),
            spread(_to_target(ok, "steps_to_target")),
            spread(_to_target(ok, "seconds_to_target")),
            spread(finals, 4),
            fmt_number(_median([r["steps_per_second"] for r in ok if r.get("steps_per_second") is not None]), 3),
            fmt_number(statistics.fmean([r["staleness_mean"] for r in ok]) if ok else math.nan, 3),
            fmt_number(_median([r["staleness_p99"] for r in ok]), 3),
            fmt_number(max((r["staleness_max"] for r in ok), default=math.nan)),
            ratio_steps,
            ratio_secs,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_report(run_dir: Path) -> dict | None:
    import json

    path = Path(run_dir) / "report.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
