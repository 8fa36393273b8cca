"""Where a launch's wall time goes: every process's CPU time, sampled while `asyncps launch` runs.

    python bench/launch_timeline.py [--config configs/mnist_mlp.yaml] [--every 0.05] [--rows 40] [override ...]

Starts one `asyncps launch` (in a fresh temporary run directory) and, every `--every` seconds,
reads each process's user + system CPU seconds from /proc (the launcher itself, then every role
in the run's pids.json). Prints the seconds at which the first progress row with a step > 0
appeared (training has started) and at which the launch exited, then one line per sample: a
process whose CPU time stands still while others wait is the critical path's gap (for instance a
whole cluster idle until gRPC's reconnect back-off ends, or workers held until their next
heartbeat). Extra arguments are config overrides, as for `asyncps launch`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import cpu_seconds  # noqa: E402  (NaN once a process is gone)


def roles(run_dir: Path) -> dict[str, int]:
    try:
        return {role: entry["pid"] for role, entry in json.loads((run_dir / "pids.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def training_started(run_dir: Path) -> bool:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if row.get("kind") == "progress" and row.get("step", 0) > 0:
                    return True
    except OSError:
        pass
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/mnist_mlp.yaml")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--rows", type=int, default=40, help="print about this many samples")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asyncps-timeline-") as tmp:
        run_dir = Path(tmp, "run")
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "asyncps.cli", "launch", args.config, f"run_dir={run_dir}",
                                 *args.overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples: list[tuple[float, dict[str, float]]] = []
        first_step = None
        while proc.poll() is None:
            now = time.perf_counter() - started
            pids = {"launcher": proc.pid, **roles(run_dir)}
            if first_step is None and training_started(run_dir):
                first_step = now
            samples.append((now, {role: c for role, pid in pids.items() if (c := cpu_seconds(pid)) == c}))
            time.sleep(args.every)
        ended = time.perf_counter() - started
    print(f"launch exited {proc.returncode} after {ended:.2f} s; training started (first progress row) at "
          + (f"{first_step:.2f} s" if first_step is not None else "never"))
    print("seconds  CPU seconds so far, per process")
    for when, cpu in samples[::max(1, len(samples) // args.rows)] + samples[-1:]:
        print(f"{when:6.2f}   " + "  ".join(f"{role}={value:.2f}" for role, value in sorted(cpu.items())))


if __name__ == "__main__":
    main()
