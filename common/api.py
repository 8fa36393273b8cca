"""The Python entry points: `asyncps.train` and `asyncps.launch`, for notebooks and scripts.

::

    import asyncps

    report = asyncps.train("configs/mnist_softmax.yaml", **{"optimizer.learning_rate": 0.05})
    report = asyncps.launch("examples/my_model/config.yaml", cluster={"workers": 2}, seed=1)
    report["final"]["accuracy"], report["run_dir"]

They do what ``asyncps train`` / ``asyncps launch`` do, with the same validation, the same run
directory (``run_dir=`` or runs/<name>-<timestamp>) and the same report.json, which they return
as a dict. A mistake in the input raises a `UserError` (a `ConfigError` for the config, a
`DataError` for data files) with the CLI's one-line message instead of exiting 2; a launched run
that fails raises `LaunchError` (its `exit_code` is the CLI's). Progress goes to stderr; `launch`
also prints the command's closing summary (run_dir, final, target) to stdout.

`config_or_path`: a YAML path, a dict shaped like the YAML, or a `Config`. Overrides are keyword
arguments: dotted names (``**{"train.max_steps": 500}``), top-level keys (``seed=3``) or nested
dicts merged into the section (``optimizer={"name": "adam", "learning_rate": 1e-3}``); values are
Python values, not YAML text.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

from asyncps.errors import ConfigError, UserError

# The heavy modules (numpy, grpc, the engine, the launcher) are imported inside the functions:
# `import asyncps` imports this module, and must stay cheap for the CLI, the roles and users who
# only want the config schema.

__all__ = ["LaunchError", "load", "launch", "train"]


class LaunchError(UserError):
    """`asyncps.launch` did not complete: `exit_code` is what `asyncps launch` would have exited
    with (2: a process met a configuration error; 1: the run failed), `run_dir` where its logs are."""

    def __init__(self, message: str, exit_code: int, run_dir: str | None):
        super().__init__(message)
        self.exit_code, self.run_dir = exit_code, run_dir


def load(config_or_path, **overrides):
    """The validated `Config` that `train` / `launch` would run (nothing is started or written)."""
    from asyncps.config import Config, from_dict, load_yaml_file

    if isinstance(config_or_path, Config):
        raw, source = config_or_path.to_dict(), "config"
    elif isinstance(config_or_path, dict):
        raw, source = copy.deepcopy(config_or_path), "config"
    elif isinstance(config_or_path, (str, Path)):
        raw, source = load_yaml_file(config_or_path), str(config_or_path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of keys at the top, got {type(raw).__name__}")
    else:
        raise ConfigError(f"asyncps: config_or_path must be a YAML path, a dict or a Config, "
                          f"got {type(config_or_path).__name__}")
    for key, value in overrides.items():
        _override(raw, key, value)
    return from_dict(raw, source=source)


def train(config_or_path, **overrides) -> dict:
    """`asyncps train` in this process: trains, writes the run directory, returns report.json's dict."""
    from asyncps.cli.data import fetch_before_run
    from asyncps.cli.train import train as train_config
    from asyncps.cli.preflight import preflight

    cfg = load(config_or_path, **overrides)
    preflight(cfg)
    fetch_before_run(cfg.data, lambda m: print(f"asyncps.train: {m}", file=sys.stderr, flush=True))
    return train_config(cfg)


def launch(config_or_path, *, resume: str | bool | None = None, **overrides) -> dict:
    """`asyncps launch`: shards, workers and the chief as processes on this machine; returns the
    report once the chief has finished. `resume`: True (the latest checkpoint of ``run_dir``) or
    a directory, as ``--resume [DIR]``.

    The resolved config goes to the launcher as a file, so the run is exactly the command's:
    the same checks before anything starts, supervision, restarts and summary.
    """
    import argparse
    import json
    import tempfile

    import yaml

    from asyncps.cli import launch as cli_launch
    from asyncps.runs import resolve_run_dir

    cfg = load(config_or_path, **overrides)
    owner = cli_launch.run_dir_of(Path(resume).resolve()) if resume and resume is not True else None
    if owner is not None and cli_launch.is_run_dir(owner):
        run_dir = str(owner)  # --resume DIR owns the run directory (cli/launch.py prepare_resume)
    elif resume is True and not cfg.run_dir:
        raise ConfigError("asyncps.launch: resume=True needs run_dir= (the run to continue)")
    else:
        run_dir = cfg.run_dir = str(resolve_run_dir(cfg).resolve())  # known here, so the report can be read back
    with tempfile.TemporaryDirectory(prefix="asyncps-launch-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        args = argparse.Namespace(config=str(path), overrides=[], dry_run=False,
                                  resume=None if not resume else ([] if resume is True else [str(resume)]))
        code = cli_launch.run(args)
    report_path = Path(run_dir) / "report.json"
    if code != 0:
        raise LaunchError(f"asyncps.launch: the run exited with status {code}{_first_error(run_dir)} "
                          f"(logs: {run_dir}/*.log)", code, run_dir)
    if not report_path.exists():
        raise LaunchError(f"asyncps.launch: the run finished without {report_path}", 1, run_dir)
    return json.loads(report_path.read_text())


def _override(raw: dict, key: str, value: Any) -> None:
    """Sets one keyword override in the raw config: a dotted key, or a dict merged into a section."""
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {key!r}: expected a key such as train.max_steps")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    _merge(node, parts[-1], value)


def _merge(node: dict, key, value) -> None:
    """node[key] = value, except that a dict merges key by key into a dict already there."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge(node[key], k, v)
    else:
        node[key] = copy.deepcopy(value)


def _first_error(run_dir: str) -> str:
    """': <the last line of the first log that ends in an error>', or ''."""
    for log in sorted(Path(run_dir).glob("*.log")):
        try:
            lines = log.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines and "error" in lines[-1].lower():
            return f": {log.stem}: {lines[-1].strip()[:300]}"
    return ""
