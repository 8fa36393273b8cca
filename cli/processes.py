"""Child processes of the launcher: started with one BLAS thread, logged to a file, never orphaned.

The launcher holds no gRPC object (a fork of a process holding one is unsafe), so it watches its
children only through their exit codes; liveness of the training itself is the chief's job.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own shutdown path still stops its children


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment, with BLAS pinned to one thread and `extra` added."""
    env = dict(os.environ)
    for var in BLAS_THREAD_VARS:
        env[var] = "1"
    env.update(extra or {})
    return env


@dataclass
class Child:
    """One role process: its command, log file, restart count and the running Popen."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    restarts: int = 0
    role: str = ""  # "ps", "worker" or "chief"
    restart_argv: list[str] | None = None  # the command of a restart, when it differs
    reported: bool = False  # its death without a restart was reported

    def restart(self) -> None:
        """Starts the process again (after reaping the dead one); counts the restart."""
        if self.popen is not None:
            self.popen.wait()
        self.restarts += 1
        if self.restart_argv is not None:
            self.argv = self.restart_argv
        with self.log_path.open("ab") as log:
            log.write(f"\n----- restart {self.restarts} of {self.name} -----\n".encode())
        self.start()

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(self.env), preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
            )
        finally:
            log.close()

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid


def python_module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def wait_for_exit(children: list[Child], timeout: float) -> bool:
    """Until every child has exited or `timeout` seconds passed; True if all exited."""
    deadline = time.monotonic() + timeout
    while any(c.poll() is None for c in children):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_all(children: list[Child], grace: float = 10.0) -> None:
    """SIGTERM every live child, wait up to `grace` seconds, then SIGKILL the rest and reap."""
    live = [c for c in children if c.poll() is None]
    for child in live:
        _signal(child, signal.SIGTERM)
    wait_for_exit(live, grace)
    for child in live:
        if child.poll() is None:
            _signal(child, signal.SIGKILL)
        if child.popen is not None:  # always, for a child that was live
            child.popen.wait()


def _signal(child: Child, sig: int) -> None:
    if child.popen is None:  # never started: nothing to signal
        return
    try:
        child.popen.send_signal(sig)
    except ProcessLookupError:
        pass
