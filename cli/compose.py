"""`asyncps compose CONFIG [key=value ...] [-o FILE]`: a docker-compose file for one cluster run.

The same YAML and overrides that `asyncps launch` takes become one compose project:

- `ps0`, `ps1`, ...: one service per shard, stable names, the shard index fixed by TF_CONFIG's
  task.index; each serves on port 2222 and is healthy once its gRPC health service says SERVING.
- `chief`: starts once every shard is healthy; its exit code is the run's result
  (deploy/run-compose.sh waits for it; `docker compose up --exit-code-from chief` too, but that
  also stops the run when any other container exits, a restarting worker included).
- `worker`: one service with `deploy.replicas: M`; compose gives replicas no index, the chief
  assigns one at registration. Workers start once the shards and the chief are healthy.

Every container gets TF_CONFIG with service-name addresses (`ps{i}:2222`, `chief:2222`), so the
image runs unchanged under Kubeflow's TFJob, which injects the same variable.

The config file itself is bind-mounted read-only at /etc/asyncps/config.yaml (path relative to
the compose file, as compose resolves it), and the overrides travel on each command line, with a
few pinned so that file and compose project cannot disagree: the cluster shape (`cluster.ps`,
`cluster.workers`), `run_dir=/runs/NAME` on the named volume `runs`, and `data.cache_dir=/cache`
on the named volume `cache` (one MNIST npz built once, under the loader's file lock).

`--shm`: the shards and the workers mount one tmpfs volume (`shm`, mode 1777 like /dev/shm) at
/dev/shm, so that ``cluster.transport`` auto/shm can move tensors through shared memory between
containers of one host (the handshake proves it, as on one machine: common/shm.py; every
container runs the same image as the same user, which the segments' mode 0600 needs). The mount
is `nocopy`: without it Docker copies the image's own /dev/shm folder (root, 0755 in an image
built from a rootfs) onto the empty volume each time a container starts, and the non-root
shards then cannot create a segment (the first run found it: every handshake refused with
EACCES, gRPC used). Without `--shm` (the default) each container has its own /dev/shm, the
handshake fails and the workers use gRPC (logged once).

A user's model or data loader (model.name / data.name ``module:attr``) must be importable in the
chief and worker containers: ``--pythonpath DIR`` bind-mounts DIR read-only at
/opt/asyncps/code/N in those services and puts it on their PYTHONPATH (or bake the code into an
image derived from asyncps's; see deploy/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from asyncps.atomic import atomic_write_bytes
from asyncps.cli.common_args import add_config_arguments, config_from_args
from asyncps.cluster import ClusterSpec
from asyncps.config import Config, is_import_path
from asyncps.errors import ConfigError

PORT = 2222
DEFAULT_IMAGE = "asyncps:latest"
CONFIG_MOUNT = "/etc/asyncps/config.yaml"
RUNS_VOLUME, RUNS_MOUNT = "runs", "/runs"
CACHE_VOLUME, CACHE_MOUNT = "cache", "/cache"
SHM_VOLUME, SHM_MOUNT = "shm", "/dev/shm"  # --shm: one tmpfs shared by the shards and workers
CODE_MOUNT = "/opt/asyncps/code"  # --pythonpath DIR number i is mounted at CODE_MOUNT/i
HEALTHCHECK = {"interval": "5s", "timeout": "5s", "retries": 5, "start_period": "20s"}
PINNED_KEYS = ("cluster.ps", "cluster.workers", "run_dir", "data.cache_dir")


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    add_config_arguments(parser)
    parser.add_argument("-o", "--output", default=None,
                        help="write the compose file here (default: print it); the config's path in it "
                             "is made relative to this file's folder")
    parser.add_argument("--image", default=DEFAULT_IMAGE,
                        help=f"the image every service runs (default {DEFAULT_IMAGE}, from deploy/build-image.sh)")
    parser.add_argument("--pythonpath", action="append", default=[], metavar="DIR",
                        help="mount DIR read-only in the chief and workers and put it on their PYTHONPATH, for a "
                             "model.name / data.name given as module:attr (repeatable)")
    parser.add_argument("--shm", action="store_true",
                        help="shards and workers share one tmpfs at /dev/shm, so cluster.transport auto/shm moves "
                             "tensors through shared memory on one host (default: each container its own; gRPC)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    output = Path(args.output) if args.output else None
    compose_dir = output.parent if output else Path.cwd()
    code = [mount_source(d, compose_dir) for d in getattr(args, "pythonpath", [])]
    if not code and (is_import_path(cfg.model.name) or is_import_path(cfg.data.name)):
        print(f"asyncps compose: note: model.name {cfg.model.name} / data.name {cfg.data.name}: the image must hold "
              "that code; --pythonpath DIR mounts it (deploy/README.md)", file=sys.stderr)
    text = render_text(cfg, config_source(args.config, compose_dir), args.overrides, args.image, pythonpath=code,
                       shm=getattr(args, "shm", False))
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(output, text.encode())
        print(f"asyncps compose: wrote {output} ({cfg.cluster.ps} shards, {cfg.cluster.workers} workers, "
              f"chief); run it with: deploy/run-compose.sh {output}", file=sys.stderr)
    return 0


def config_source(config_path: str | Path, compose_dir: Path) -> str:
    """The config's path as the compose file names it: relative to the compose file's folder,
    starting with ``.`` so that compose reads it as a path and not as a volume name."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    rel = PurePosixPath(Path(os.path.relpath(path.resolve(), compose_dir.resolve())).as_posix())
    return str(rel) if str(rel).startswith(".") else f"./{rel}"


def mount_source(directory: str | Path, compose_dir: Path) -> str:
    """A --pythonpath folder as the compose file names it (relative, starting with ``.``)."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"--pythonpath {directory}: no such directory")
    rel = PurePosixPath(Path(os.path.relpath(path.resolve(), compose_dir.resolve())).as_posix())
    return str(rel) if str(rel).startswith(".") else f"./{rel}"


def render_text(cfg: Config, source: str, overrides: list[str] | tuple[str, ...] = (),
                image: str = DEFAULT_IMAGE, pythonpath: list[str] | tuple[str, ...] = (), shm: bool = False) -> str:
    """The compose file as YAML text, with a header saying where it came from."""
    words = " ".join([source, *overrides])
    header = (f"# Rendered by `asyncps compose` from {words}; edit the config and re-render instead of\n"
              f"# editing this file. Run it with deploy/run-compose.sh FILE (see deploy/README.md).\n")
    return header + yaml.safe_dump(render(cfg, source, overrides, image, pythonpath, shm), sort_keys=False, width=1000)


def render(cfg: Config, source: str, overrides: list[str] | tuple[str, ...] = (),
           image: str = DEFAULT_IMAGE, pythonpath: list[str] | tuple[str, ...] = (), shm: bool = False) -> dict[str, Any]:
    """The compose document: services ps0..psN-1, chief, worker (scaled), and the named volumes."""
    spec = compose_cluster_spec(cfg)
    args = container_overrides(cfg, overrides)
    shards = [f"ps{i}" for i in range(cfg.cluster.ps)]
    services: dict[str, Any] = {}
    for i, name in enumerate(shards):
        services[name] = _service(cfg, "ps", spec.tf_config("ps", i), source, args, image, healthy=True)
    services["chief"] = _service(cfg, "chief", spec.tf_config("chief", 0), source, args, image, healthy=True,
                                 after=shards, data=True, code=pythonpath)
    worker = _service(cfg, "worker", spec.tf_config("worker", 0), source, args, image, healthy=False,
                      after=[*shards, "chief"], data=True, code=pythonpath)
    worker["deploy"] = {"replicas": cfg.cluster.workers}
    services["worker"] = worker
    volumes: dict[str, Any] = {RUNS_VOLUME: {}, CACHE_VOLUME: {}}
    if shm:  # --shm (module docstring)
        for name in [*shards, "worker"]:
            services[name]["volumes"].append(f"{SHM_VOLUME}:{SHM_MOUNT}:nocopy")
        volumes[SHM_VOLUME] = {"driver": "local", "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": "mode=1777"}}
    return {"services": services, "volumes": volumes}


def compose_cluster_spec(cfg: Config) -> ClusterSpec:
    """Service-name addresses on the customary port: ps{i}:2222, chief:2222."""
    return ClusterSpec(chief=f"chief:{PORT}", ps=tuple(f"ps{i}:{PORT}" for i in range(cfg.cluster.ps)),
                       workers=cfg.cluster.workers)


def container_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The user's overrides, minus the keys compose pins, plus the pinned values."""
    kept = [o for o in overrides if o.partition("=")[0].strip() not in PINNED_KEYS]
    return kept + [
        f"cluster.ps={cfg.cluster.ps}",
        f"cluster.workers={cfg.cluster.workers}",
        f"run_dir={RUNS_MOUNT}/{run_name(cfg)}",
    ] + ([] if is_import_path(cfg.data.name) else [f"data.cache_dir={CACHE_MOUNT}"])  # a user's loader: no cache_dir


def run_name(cfg: Config) -> str:
    """The run directory's name on the `runs` volume: the config's run_dir's last part, else its name."""
    return Path(cfg.run_dir).name if cfg.run_dir else cfg.name


def restart_policy(cfg: Config, role: str) -> str:
    """compose's `restart` for a role, from `cluster.restart_policy` (what `asyncps launch` obeys).

    `on_failure` with `max_restarts: n` becomes `on-failure:n` (n = 0: no restarts, as in launch);
    `never` becomes `no`. The defaults restart shards and workers, not the chief, whose exit is
    the run's result.
    """
    policy = cfg.cluster.restart_policy
    if getattr(policy, role) == "on_failure" and policy.max_restarts > 0:
        return f"on-failure:{policy.max_restarts}"
    return "no"


def _service(cfg: Config, role: str, tf_config: str, source: str, args: list[str], image: str, *,
             healthy: bool, after: Sequence[str] = (), data: bool = False, code=()) -> dict[str, Any]:
    """One service: the image, the role's command, TF_CONFIG, volumes, readiness and restarts."""
    volumes = [f"{source}:{CONFIG_MOUNT}:ro", f"{RUNS_VOLUME}:{RUNS_MOUNT}"]
    if data:
        volumes.append(f"{CACHE_VOLUME}:{CACHE_MOUNT}")
    service: dict[str, Any] = {
        "image": image,
        "command": [role, CONFIG_MOUNT, *args],
        "environment": {"TF_CONFIG": tf_config},
        "volumes": volumes,
        "init": True,  # a real PID 1 forwards signals and reaps children
        "restart": restart_policy(cfg, role),
    }
    if code:  # a user's model / data code (--pythonpath), read-only
        volumes += [f"{src}:{CODE_MOUNT}/{i}:ro" for i, src in enumerate(code)]
        service["environment"]["PYTHONPATH"] = ":".join(f"{CODE_MOUNT}/{i}" for i in range(len(code)))
    if healthy:
        service["healthcheck"] = {"test": ["CMD", "asyncps", "health", f"127.0.0.1:{PORT}"], **HEALTHCHECK}
    if after:
        service["depends_on"] = {name: {"condition": "service_healthy"} for name in after}
    return service
