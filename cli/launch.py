"""`asyncps launch CONFIG`: a whole cluster on this machine, as separate OS processes.

N parameter-server shards, M workers and the chief each run `python -m asyncps.cli ROLE` with a
TF_CONFIG cluster description in their environment and one log file in the run directory. The
run ends when the chief exits: its exit code is the launch's exit code.

A process that dies (non-zero exit or a signal) is restarted per `cluster.restart_policy`
(`on_failure`, at most `max_restarts` times per process; `never`): a restarted shard comes back
empty on the same port and the chief restores every shard from the latest checkpoint; a
restarted worker registers again and gets a free index; a restarted chief continues with the
shards' state (`checkpoint.resume=latest`). A shard or chief that is not restarted ends the run.
`pids.json` in the run directory names every live process (updated on each restart).

`--resume [DIR]` continues a run from its latest valid checkpoint (DIR: a run directory, a
checkpoints folder or one ckpt-* folder; without DIR, the run directory given by `run_dir=`).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from asyncps.atomic import atomic_write_bytes, atomic_write_json
from asyncps.cli.data import fetch_before_run
from asyncps.cli.common_args import add_config_arguments, config_from_args
from asyncps.cli.processes import Child, can_fork, preload_roles, python_module_argv, stop_all, wait_for_exit
from asyncps.cli.summary import logs_hint, summary_lines
from asyncps.cli.watch import RunWatcher
from asyncps.cluster import check_ports_free, spec_for_launch
from asyncps.config import Config, load_yaml_file
from asyncps.errors import ConfigError, UserError
from asyncps.cli.preflight import preflight
from asyncps.runs import resolve_run_dir

POLL_SECONDS = 0.1
OWN_EXIT_SECONDS = 5.0  # after the chief's success, time the others get to exit by themselves
PIDS_FILE = "pids.json"
CONFIG_ERROR = 2  # the exit status of a process that met a configuration error (never restarted)


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and each command line, then exit")
    # nargs="*": overrides may follow `--resume [DIR]` (argparse would refuse them otherwise)
    parser.add_argument("--resume", nargs="*", default=None, metavar="DIR",
                        help="continue from the latest valid checkpoint of the run (run_dir=) or of DIR "
                             "(a run directory, a checkpoints folder or a ckpt-* folder)")


def run(args: argparse.Namespace) -> int:
    take_misplaced_override(args)
    cfg = config_from_args(args)
    preflight(cfg)  # a user's model.name / data.name (module:attr): one line now, not one per process
    refuse_train_only(cfg)
    found = prepare_resume(cfg, args.resume) if args.resume else None
    if args.dry_run:
        return dry_run(cfg)
    if found is not None:  # not on --dry-run: it moves folders
        from asyncps.chief.checkpointer import checkpoint_dir

        set_aside_newer(found, checkpoint_dir(cfg.checkpoint, resolved_run_dir(cfg)))
    check_ports_free(cfg)
    fetch_before_run(cfg.data, lambda m: print(f"asyncps launch: {m}", file=sys.stderr, flush=True))
    cfg.run_dir = str(resolve_run_dir(cfg).resolve())
    children = plan_children(cfg)
    ps, workers = cfg.cluster.ps, cfg.cluster.workers
    print(f"asyncps launch: run_dir {cfg.run_dir}; {ps} shard{'s' * (ps != 1)}, {workers} worker{'s' * (workers != 1)}, "
          f"mode {cfg.cluster.mode}" + (f"; resuming from {cfg.checkpoint.resume}" if args.resume else ""),
          file=sys.stderr)
    code = supervise(children, cfg)
    report_path = Path(cfg.run_dir) / "report.json"
    if code == 0 and report_path.exists():
        report = json.loads(report_path.read_text())
        for line in summary_lines(report, logs=logs_hint(cfg.run_dir)):
            print(line)
    return code


def refuse_train_only(cfg: Config) -> None:
    """Keys that only `asyncps train` runs (a simulated cluster, W workers per clock) would be
    ignored by a real cluster: refused in one line instead."""
    if cfg.staleness.simulate is not None:
        raise UserError("staleness.simulate simulates a cluster inside `asyncps train`; a launched cluster is "
                        "real: drop the key, or run `asyncps train`")
    if cfg.staleness.workers > 1:
        raise UserError(f"staleness.workers={cfg.staleness.workers} (W workers per clock) runs in `asyncps train` "
                        "only; a launched cluster has cluster.workers real workers")


def take_misplaced_override(args: argparse.Namespace) -> None:
    """`--resume [DIR] key=value...`: the overrides after --resume go back to the overrides;
    args.resume becomes DIR, "latest" (no DIR) or None (no --resume)."""
    if args.resume is None:
        return
    dirs = [a for a in args.resume if "=" not in a or Path(a).exists()]
    args.overrides += [a for a in args.resume if a not in dirs]
    if len(dirs) > 1:
        raise UserError(f"--resume takes one DIR, got {len(dirs)}: {' '.join(dirs)}")
    args.resume = dirs[0] if dirs else "latest"
    explicit = [a.partition("=")[2] for a in args.overrides if a.startswith("run_dir=")]
    if dirs and explicit:  # --resume DIR owns the run directory: a second one is a contradiction
        owner = run_dir_of(Path(dirs[0]).resolve())
        if is_run_dir(owner) and Path(explicit[-1]).resolve() != owner:
            raise UserError(f"--resume {dirs[0]} continues the run in {owner}, run_dir={explicit[-1]} names another "
                            f"directory (drop run_dir=, or copy the run there and resume the copy)")


# Paths of a run's config that may point inside its run directory: re-rooted when the run is
# resumed from another place (a copy, a move). checkpoint.dir always; the TLS files if there.
REROOTED = ("checkpoint.dir", "cluster.security.dir", "cluster.security.ca", "cluster.security.cert",
            "cluster.security.key", "cluster.security.token_file")


def prepare_resume(cfg: Config, spec: str):
    """Sets the run directory and `checkpoint.resume`; checks now, before anything starts, that a
    valid checkpoint exists and that this config can continue it (else UserError: exit 2).

    `--resume DIR` owns the run directory: the run DIR is (or whose checkpoints it holds), not
    the run_dir a YAML names (a copied run's config.yaml names the original). Paths that pointed
    inside the directory the run was written in (checkpoint.dir, ...) are re-rooted into it, so
    a copied or moved run never reads or writes the original; its metrics.jsonl, and so its
    failure history, are those of the copy. A config without checkpoint.dir continues in the
    folder the run's own config.yaml names.
    """
    from asyncps.chief import checkpoint as ckpt
    from asyncps.chief.checkpointer import checkpoint_dir

    if spec == "latest":
        if not cfg.run_dir:
            raise UserError("--resume without DIR needs run_dir=PATH (the run to continue)")
        run_dir = Path(cfg.run_dir).resolve()
    else:
        path = Path(spec).resolve()
        if not path.exists():
            raise UserError(f"--resume {spec}: no such file or directory")
        owner = run_dir_of(path)
        if not (is_run_dir(owner) or path.name.startswith("ckpt-") or any(path.glob("ckpt-*"))):
            raise UserError(f"--resume {spec}: not a run directory (no config.yaml, metrics.jsonl or ckpt-* "
                            f"folder), a checkpoints folder or a ckpt-* folder")
        run_dir = owner if is_run_dir(owner) or not cfg.run_dir else Path(cfg.run_dir).resolve()
    recorded = _recorded_config(run_dir)
    if not cfg.checkpoint.dir and isinstance(recorded.get("checkpoint"), dict) and recorded["checkpoint"].get("dir"):
        cfg.checkpoint.dir = str(recorded["checkpoint"]["dir"])
    _reroot(cfg, [cfg.run_dir, recorded.get("run_dir")], run_dir)
    cfg.run_dir = str(run_dir)
    if spec != "latest":  # the run's own folder means its checkpoints, wherever checkpoint.dir puts them
        spec = str(checkpoint_dir(cfg.checkpoint, run_dir).resolve() if path == run_dir else path)
    found = ckpt.resolve(spec, checkpoint_dir(cfg.checkpoint, run_dir),
                         warn=lambda m: print(f"asyncps launch: {m}", file=sys.stderr, flush=True))
    problems = ckpt.config_mismatches(found.manifest, cfg.to_dict())
    if problems:
        raise UserError(f"--resume: {found.path} cannot continue with this config: {'; '.join(problems)} "
                        f"(these keys must match the checkpoint's, see docs/failures.md)")
    print(f"asyncps launch: resuming from {found.path} (step {found.step})", file=sys.stderr)
    cfg.checkpoint.resume = spec
    return found


def set_aside_newer(found, folder: Path) -> None:
    """Resuming from a checkpoint older than the newest: the newer ones belong to the timeline
    being abandoned. Left where they are, a later restart (`latest`) or a shard repair would
    restore them, and pruning would delete the checkpoint resumed from first. They are moved,
    not deleted, into `abandoned-<time>/` beside them, said in one line."""
    from asyncps.chief import checkpoint as ckpt

    newer = [p for p in ckpt.list_checkpoints(folder) if ckpt.step_of(p) > found.step]
    if not newer:
        return
    aside = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for path in newer:
        path.rename(aside / path.name)
    print(f"asyncps launch: {len(newer)} newer checkpoint(s) of the abandoned timeline moved to {aside}",
          file=sys.stderr)


def is_run_dir(path: Path) -> bool:
    """A folder `asyncps launch` ran in: it holds the run's config.yaml or metrics.jsonl."""
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def run_dir_of(path: Path) -> Path:
    """The run directory a --resume DIR belongs to: DIR when it is one (is_run_dir), else the run
    directory holding DIR's checkpoints folder (whatever its name), else, for checkpoints kept
    outside any run, DIR itself or the folder above one named checkpoints/."""
    if path.name.startswith("ckpt-") and not is_run_dir(path):
        path = path.parent
    if is_run_dir(path):
        return path
    if is_run_dir(path.parent) and any(path.glob("ckpt-*")):
        return path.parent
    return path.parent if path.name == "checkpoints" else path


def _recorded_config(run_dir: Path) -> dict:
    """The run's config.yaml as written by its launch ({} without one). Its run_dir is where the
    run was written: a copy's names the original."""
    try:
        recorded = load_yaml_file(run_dir / "config.yaml")  # the config loader's size/depth/alias limits
    except ConfigError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _reroot(cfg: Config, old_roots: list, new_root: Path) -> None:
    """Paths of REROOTED inside an old run directory move into `new_root` (the TLS files only when
    the copy has them)."""
    olds = {Path(o).resolve() for o in old_roots if isinstance(o, str) and o} - {new_root}
    for dotted in REROOTED:
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, leaf)
        if not value:
            continue
        value = str(Path(value).resolve())  # relative to the cwd, symlinks followed: as the roots
        if Path(value).is_relative_to(new_root):
            continue
        for old in olds:
            if Path(value).is_relative_to(old):
                moved = new_root / Path(value).relative_to(old)
                if leaf == "dir" and parents == ["checkpoint"] or moved.exists():
                    setattr(node, leaf, str(moved))
                break


def resolved_run_dir(cfg: Config) -> Path:
    """`run_dir`, which is set before anything needs it: by run() (resolve_run_dir), prepare_resume
    or dry_run; a caller that skipped that step gets this error, not a TypeError from Path(None)."""
    if not cfg.run_dir:
        raise ValueError("run_dir is not resolved yet (runs.resolve_run_dir sets it)")
    return Path(cfg.run_dir)


def write_run_config(cfg: Config) -> Path:
    """The resolved config every child reads, so all of them see exactly the same run."""
    path = resolved_run_dir(cfg) / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    return path


def plan_children(cfg: Config, config_path: Path | None = None) -> list[Child]:
    """Shards first, then the chief, then the workers: the order they are started in."""
    spec = spec_for_launch(cfg)
    run_dir = resolved_run_dir(cfg)
    config_path = config_path or write_run_config(cfg)
    tasks = [("ps", i) for i in range(cfg.cluster.ps)] + [("chief", 0)]
    tasks += [("worker", i) for i in range(cfg.cluster.workers)]
    children = []
    for role, index in tasks:
        name = f"{role}{index}" if role != "chief" else "chief"
        argv = python_module_argv("asyncps.cli", role, str(config_path))
        children.append(Child(name=name, argv=argv, log_path=run_dir / f"{name}.log", role=role,
                              env={"TF_CONFIG": spec.tf_config(role, index)},
                              restart_argv=argv + ["checkpoint.resume=latest"] if role == "chief" else None))
    return children


def dry_run(cfg: Config) -> int:
    cfg.run_dir = cfg.run_dir or "runs/<name>-<timestamp>"
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    for child in plan_children(cfg, config_path=Path(cfg.run_dir) / "config.yaml"):
        print(f"# {child.name}\nTF_CONFIG={shlex.quote(child.env['TF_CONFIG'])} {shlex.join(child.argv)}")
    return 0


def supervise(children: list[Child], cfg: Config | None = None, stream=None) -> int:
    """Start every child, restart the dead per policy, wait for the chief, then stop the rest;
    never leave an orphan. Shows the run's progress (cli/watch.py) while it trains.

    A child that exits 2 has a configuration error (a port in use, a bad path): it is never
    restarted, its one-line message is repeated here and the launch exits 2.
    """
    chief = next(c for c in children if c.name == "chief")
    policy = cfg.cluster.restart_policy if cfg is not None else None
    pids_path = resolved_run_dir(cfg) / PIDS_FILE if cfg is not None else None
    watcher = RunWatcher(resolved_run_dir(cfg), cfg.train.max_steps, cfg.cluster.workers,
                         stream=stream or sys.stderr) if cfg is not None else None
    say = watcher.event if watcher is not None else (lambda m: print(f"asyncps launch: {m}", file=sys.stderr))
    try:
        if can_fork():
            preload_roles()
        for child in children:
            child.start()
        write_pids(pids_path, children)
        while True:
            if (bad := config_error(children)) is not None:
                say(f"error: {bad.name}: {last_line(bad.log_path)} (see {bad.log_path})")
                return 2
            for child in children:
                if died(child) and policy is not None and may_restart(child, policy):
                    say(f"{child.name} exited with code {child.poll()}; restarting it "
                        f"({child.restarts + 1} of {policy.max_restarts})")
                    child.restart()
                    write_pids(pids_path, children)
                elif died(child) and not child.reported and child.role == "worker":  # a shard or the chief ends the run
                    child.reported = True
                    say(f"{child.name} exited with code {child.poll()} (see {child.log_path}); "
                        f"not restarted (cluster.restart_policy)")
            if watcher is not None:
                watcher.poll(sum(c.restarts for c in children))
            if (code := chief.poll()) is not None:
                break
            failed = failed_shard(children, policy)
            if failed is not None:
                say(f"{failed.name} exited with code {failed.poll()} (see {failed.log_path}); stopping the run")
                return 1
            if no_worker_left(children, policy):  # else the chief would wait for pushes forever
                say("every worker exited with an error and none will be restarted "
                    f"(see {', '.join(str(c.log_path) for c in children if c.role == 'worker')}); stopping the run")
                return 1
            time.sleep(POLL_SECONDS)
        if watcher is not None:
            watcher.close()
        if code == CONFIG_ERROR:
            say(f"error: chief: {last_line(chief.log_path)} (see {chief.log_path})")
        elif code != 0:
            say(f"the chief exited with code {code} (see {chief.log_path})")
        else:
            wait_for_exit(children, OWN_EXIT_SECONDS)  # workers and shards finish on their own
        return code
    finally:
        stop_all(children)
        if cfg is not None and cfg.run_dir:  # segments of a SIGKILLed shard or worker (asyncps.shm)
            from asyncps.shm import prefix_for, remove_segments

            remove_segments(prefix_for(cfg.run_dir))


def config_error(children: list[Child]) -> Child | None:
    """A shard or worker that exited 2: a configuration error, which no restart can fix (the
    chief's own exit 2 ends the run through its exit code)."""
    return next((c for c in children if c.role != "chief" and c.poll() == CONFIG_ERROR), None)


def last_line(path: Path) -> str:
    """The last non-empty line of a log (a role's one-line error), at most 500 characters."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:500] if lines else "(empty log)"


def died(child: Child) -> bool:
    """Exited non-zero or killed by a signal (a clean exit 0 is the end of its work)."""
    return child.poll() not in (None, 0)


def may_restart(child: Child, policy) -> bool:
    """Per policy, and never after a configuration error (exit 2)."""
    return child.poll() != CONFIG_ERROR and policy is not None and getattr(policy, child.role) == "on_failure" and child.restarts < policy.max_restarts


def write_pids(path: Path | None, children: list[Child]) -> None:
    if path is not None:
        atomic_write_json(path, {c.name: {"pid": c.pid, "restarts": c.restarts, "started": c.started} for c in children})


def no_worker_left(children: list[Child], policy) -> bool:
    """Every worker died for good (a clean exit 0 only follows the chief's stop, so it does not count)."""
    workers = [c for c in children if c.role == "worker"]
    return bool(workers) and all(died(c) and not may_restart(c, policy) for c in workers)


def failed_shard(children: list[Child], policy) -> Child | None:
    """A parameter-server shard that died and will not be restarted: the run cannot go on.

    Asks the policy itself, like `no_worker_left`: a shard that dies after this loop's restart
    pass and before this check (a SIGKILL at that moment) is restarted on the next pass, not
    taken for a shard the policy gave up on (that race once ended a run under load)."""
    for child in children:
        if child.name.startswith("ps") and died(child) and not may_restart(child, policy):
            return child
    return None
