"""`asyncps sweep CONFIG [key=a,b,c ...] [--seeds N] [--parallel P] [--out DIR]`: a grid of runs.

Every combination of the listed values (Hydra's grammar: ``key=a,b,c`` is an axis, ``key=v`` a
fixed override) runs once per seed 0..N-1 (``seed=`` override), each in its own directory
``OUT/<setting>/seed<k>``, through ``asyncps launch`` or ``asyncps train``:

- ``runner=train|launch`` picks it (``runner=train,launch`` is an axis like any other, and the
  train runner gives the staleness-0 baseline);
- without it, runs with ``staleness.controlled: true`` use ``train`` (the single-process study
  mode), all others ``launch``.

Runs go in sequence, or P at a time. A run directory holding a report.json is skipped, so an
interrupted sweep resumes where it stopped (a directory without one is cleared and run again).
At the end: ``results.csv`` (one row per run), ``summary.md`` (one row per setting) and, when
matplotlib is importable, PNG plots (see `asyncps.cli.sweep_plots`).
"""
from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from asyncps.atomic import atomic_write_bytes
from asyncps.config import load_config
from asyncps.errors import ConfigError
from asyncps.sweep import Grid, Setting, default_runner, parse_grid, read_report, result_row, summary_markdown


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("config", help="the YAML file every run starts from (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=a,b,c",
                        help="an axis (key=a,b,c), a fixed override (key=v), runner=train|launch, seed=0,1,2")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 for every setting (default 1)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1: in sequence)")
    parser.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<name>-<timestamp>)")
    parser.add_argument("--dry-run", action="store_true", help="print every run's command line, then exit")


@dataclass
class PlannedRun:
    setting: Setting
    seed: int
    runner: str
    run_dir: Path
    argv: list[str]


def plan(config: str, grid: Grid, out: Path) -> list[PlannedRun]:
    """Every run of the sweep; each setting's config is loaded (validated) before anything starts."""
    seeds = grid.seeds if grid.seeds is not None else [0]
    runs = []
    for setting in grid.settings():
        overrides = grid.fixed + setting.overrides()
        cfg = load_config(config, overrides)
        runner = setting.get("runner") or grid.runner or default_runner(cfg)
        for seed in seeds:
            run_dir = out / setting.name / f"seed{seed}"
            argv = [sys.executable, "-m", "asyncps.cli", runner, str(config), *overrides,
                    f"seed={seed}", f"run_dir={run_dir}"]
            runs.append(PlannedRun(setting, seed, runner, run_dir, argv))
    return runs


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.overrides)
    if args.seeds is not None:
        if grid.seeds is not None:
            raise ConfigError("give the seeds either as --seeds N or as seed=a,b,c, not both")
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        grid.seeds = list(range(args.seeds))
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
    name = load_config(args.config, grid.fixed).name
    out = Path(args.out or f"runs/sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = plan(args.config, grid, out)
    if args.dry_run:
        for r in runs:
            print(shlex.join(r.argv))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["asyncps", "sweep", str(args.config), *args.overrides]
                         + (["--seeds", str(args.seeds)] if args.seeds else [])
                         + (["--parallel", str(args.parallel)] if args.parallel > 1 else [])
                         + ["--out", str(out)])
    print(f"asyncps sweep: {len(runs)} runs ({len(grid.settings())} settings x {len(runs) // len(grid.settings())} seeds) "
          f"into {out}, {args.parallel} at a time", file=sys.stderr)
    start = time.perf_counter()
    statuses = execute(runs, args.parallel)
    write_tables(out, grid.settings(), runs, statuses, f"Sweep of {args.config}", command)
    plotted = plot(out, grid.settings(), runs)
    failed = sum(s == "failed" for s in statuses)
    print(f"asyncps sweep: {len(runs) - failed}/{len(runs)} runs ok in {time.perf_counter() - start:.1f} s; "
          f"{out / 'results.csv'}, {out / 'summary.md'}" + (f", {len(plotted)} plots" if plotted else ""), file=sys.stderr)
    print((out / "summary.md").read_text())
    return 1 if failed else 0


def execute(runs: list[PlannedRun], parallel: int) -> list[str]:
    """Runs every planned run not done yet; its status: ok, skipped (done before) or failed."""
    lock, done = threading.Lock(), [0]

    def one(i: int) -> str:
        r = runs[i]
        if (r.run_dir / "report.json").exists():
            status, took = "skipped", 0.0
        else:
            if r.run_dir.exists():
                shutil.rmtree(r.run_dir)  # an interrupted run: start it again from nothing
            r.run_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            with (r.run_dir / "sweep_run.log").open("w") as log:
                log.write("# " + shlex.join(r.argv) + "\n")
                log.flush()
                code = subprocess.call(r.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            took = time.perf_counter() - t0
            status = "ok" if code == 0 and (r.run_dir / "report.json").exists() else "failed"
        with lock:
            done[0] += 1
            note = {"ok": f"done in {took:.1f} s", "skipped": "already done (report.json)",
                    "failed": f"FAILED (see {r.run_dir / 'sweep_run.log'})"}[status]
            print(f"[{done[0]}/{len(runs)}] {r.setting.name} seed{r.seed} ({r.runner}): {note}", file=sys.stderr, flush=True)
        return status

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, range(len(runs))))


def write_tables(out: Path, settings: list[Setting], runs: list[PlannedRun], statuses: list[str],
                 title: str, command: str) -> list[dict]:
    """results.csv (one row per run) and summary.md (one row per setting)."""
    rows = []
    axis_keys = [k for k, _ in settings[0].values] if settings else []
    for r, status in zip(runs, statuses):
        report = read_report(r.run_dir)
        row = {"setting": r.setting.name, **dict(r.setting.values), "seed": r.seed,
               "status": "failed" if report is None else "ok"}
        if report is not None:
            row.update(result_row(report))
        else:
            row["runner"] = r.runner
        row["run_dir"] = str(r.run_dir)
        rows.append(row)
    columns: list[str] = ["setting", *axis_keys, "seed", "status"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    with (out / "results.csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    (out / "results.csv.tmp").replace(out / "results.csv")
    atomic_write_bytes(out / "summary.md", summary_markdown(settings, rows, title, command).encode())
    return rows


def plot(out: Path, settings: list[Setting], runs: list[PlannedRun]) -> list[Path]:
    """The PNG plots, or a one-line notice when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("asyncps sweep: matplotlib is not installed, tables only; `pip install asyncps[plot]` for plots",
              file=sys.stderr)
        return []
    from asyncps.cli.sweep_plots import plot_sweep

    return plot_sweep(out, [(r.setting.name, r.seed, r.run_dir) for r in runs], [(s.name, s.values) for s in settings])
