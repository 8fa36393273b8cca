"""CPU seconds of a process from /proc, for the benches that compare roles' CPU (one reader for all)."""
from __future__ import annotations

import os


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process, all its threads (/proc/PID/stat); NaN if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
