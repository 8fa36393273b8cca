"""Child processes of the launcher: started with one BLAS thread, logged to a file, never orphaned.

The launcher holds no gRPC object (a fork of a process holding one is unsafe), so it watches its
children only through their exit codes; liveness of the training itself is the chief's job.

How a child starts. `asyncps launch` (the command, `allow_fork`) forks each role from the
launcher, which has imported the roles' modules once (`preload_roles`): a role that would spend
about 0.3 CPU-s importing numpy, gRPC, protobuf and asyncps starts with them loaded. On 2 cores
the five processes of the shipped config spent about 1 s of a launch's start-up importing side by
side (bench/launch_timeline.py). Forking is safe here because the launcher has one thread, has
created no gRPC object (importing grpc creates none; gRPC's fork handlers are off by default) and
runs BLAS on one thread (`pin_blas_threads` set the environment before numpy loaded). Anywhere
else it execs a fresh interpreter as before: a process that did not opt in (a notebook's
`asyncps.launch`, a test), one with more threads, BLAS not pinned to 1, or ASYNCPS_SPAWN=exec.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SPAWN_ENV = "ASYNCPS_SPAWN"  # "exec": never fork roles from the launcher
CLI_MODULE = "asyncps.cli"
ROLE_MODULES = ("asyncps.cli.roles", "asyncps.ps.server", "asyncps.worker.main", "asyncps.chief.main")

_fork_allowed = False


def allow_fork() -> None:
    """Declares this process the `asyncps launch` command: it will create no gRPC object, so its
    children may be forked from it (module docstring). Call it before anything else runs."""
    global _fork_allowed
    _fork_allowed = True


def can_fork() -> bool:
    """Whether a child may be forked from this process now (module docstring)."""
    return (_fork_allowed and sys.platform.startswith("linux") and os.environ.get(SPAWN_ENV, "") != "exec"
            and all(os.environ.get(var) == "1" for var in BLAS_THREAD_VARS) and _threads() == 1)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # unknown: do not fork


def preload_roles() -> None:
    """Import what every role imports, once, so forked children start with it (about 0.3 s each)."""
    for module in ROLE_MODULES:
        importlib.import_module(module)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own shutdown path still stops its children


def _name_process(name: str) -> None:
    """The name `ps -o comm` and `top` show (Linux keeps 15 bytes)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment, with BLAS pinned to one thread and `extra` added."""
    env = dict(os.environ)
    for var in BLAS_THREAD_VARS:
        env[var] = "1"
    env.update(extra or {})
    return env


@dataclass
class Child:
    """One role process: its command, log file, restart count and the running process (a Popen,
    or a ForkedProcess when forked from the launcher)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: "subprocess.Popen | ForkedProcess | None" = None
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
            cli_args = self.argv[3:] if self.argv[:3] == python_module_argv(CLI_MODULE) else None
            if cli_args is not None and can_fork():
                self.popen = ForkedProcess.start(cli_args, log.fileno(), child_env(self.env))
                return
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

    @property
    def started(self) -> str:
        """How the running process was started: "fork" (from the launcher), "exec", or "" (not yet)."""
        if self.popen is None:
            return ""
        return "fork" if isinstance(self.popen, ForkedProcess) else "exec"


class ForkedProcess:
    """A role forked from the launcher, with the part of Popen's interface the launcher uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, cli_args: list[str], log_fd: int, env: dict[str, str]) -> "ForkedProcess":
        """Fork; the child runs ``asyncps <cli_args>`` as `python -m asyncps.cli` would, with
        `env` as its environment and stdout and stderr on `log_fd`, in a session of its own."""
        for stream in (sys.stdout, sys.stderr):  # else the child inherits (and writes) the launcher's buffers
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        pid = os.fork()
        if pid == 0:
            _run_forked(cli_args, log_fd, env)  # never returns
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, status unknown
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None and self.returncode is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:  # reaped elsewhere: gone, status unknown
                self.returncode = -1
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]  # set by poll

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # like Popen: a reaped pid may belong to someone else now
            os.kill(self.pid, sig)


def _run_forked(cli_args: list[str], log_fd: int, env: dict[str, str]) -> None:
    """The forked child: becomes the role process `asyncps <cli_args>` and exits with its code."""
    global _fork_allowed
    _fork_allowed = False  # a role starts no children of its own
    code = 1
    try:
        os.setsid()  # as start_new_session: Ctrl-C reaches the launcher only
        _die_with_parent()
        _name_process(f"asyncps-{cli_args[0]}")  # ps/top: its command line is still the launcher's
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        sys.argv = [CLI_MODULE, *cli_args]
        from asyncps.cli.main import main

        code = main(cli_args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - whatever happens, this process must end here
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


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
