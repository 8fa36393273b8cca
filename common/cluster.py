"""Who is where: the cluster description every process reads, in TensorFlow's TF_CONFIG shape.

`asyncps launch` builds one and hands it to each child in the TF_CONFIG environment variable, so
the same role processes also start unchanged under Kubeflow's TFJob, which injects TF_CONFIG:

    {"cluster": {"chief": ["host:port"], "ps": ["h1:p", "h2:p"], "worker": ["h3:p", ...]},
     "task": {"type": "ps", "index": 1}}

Workers need no address of their own (they serve nothing), so "worker" may be absent or hold
placeholders; the chief assigns worker indices at registration.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

from asyncps.config import Config
from asyncps.errors import ConfigError, UserError

ROLES = ("chief", "ps", "worker")


@dataclass(frozen=True)
class ClusterSpec:
    """Addresses of the chief and of every parameter-server shard, plus this process's task."""

    chief: str
    ps: tuple[str, ...]
    workers: int
    task_type: str | None = None
    task_index: int | None = None
    worker_addresses: tuple[str, ...] = field(default=())

    def tf_config(self, task_type: str, index: int = 0) -> str:
        """The TF_CONFIG JSON for one task of this cluster."""
        cluster = {"chief": [self.chief], "ps": list(self.ps)}
        if self.worker_addresses:
            cluster["worker"] = list(self.worker_addresses)
        return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def parse_tf_config(text: str, workers_default: int) -> ClusterSpec:
    """Read a TF_CONFIG JSON; errors name the missing or malformed part."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc.msg} at char {exc.pos})") from None
    cluster = doc.get("cluster") if isinstance(doc, dict) else None
    if not isinstance(cluster, dict):
        raise ConfigError('TF_CONFIG: expected {"cluster": {...}, "task": {...}}')
    for role in ("chief", "ps"):
        if not isinstance(cluster.get(role), list) or not cluster[role]:
            raise ConfigError(f"TF_CONFIG: cluster.{role} must be a non-empty list of host:port")
    task = doc.get("task") or {}
    task_type = task.get("type")
    if task_type is not None and task_type not in ROLES:
        raise ConfigError(f"TF_CONFIG: task.type must be one of {', '.join(ROLES)}, got {task_type!r}")
    workers = cluster.get("worker") or []
    return ClusterSpec(
        chief=cluster["chief"][0], ps=tuple(cluster["ps"]), workers=len(workers) or workers_default,
        task_type=task_type, task_index=task.get("index"), worker_addresses=tuple(workers),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; the window for a clash is tiny)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True when nothing can listen on host:port now (another process holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server bind
        try:
            s.bind((bind_host(host), port))
        except OSError:
            return True
    return False


def fixed_ports(cfg: Config) -> list[tuple[str, str, int]]:
    """(config key, host, port) of every port the YAML fixes for a local launch."""
    c, t = cfg.cluster, cfg.telemetry
    out = [("cluster.chief_port", c.host, c.chief_port)] if c.chief_port else []
    out += [(f"cluster.ps_ports[{i}]", c.host, p) for i, p in enumerate(c.ps_ports or [])]
    if t.prometheus_port:
        count = 1 + c.ps + c.workers  # chief, shards, workers: base, base + 1, ... (common/telemetry.py)
        out += [("telemetry.prometheus_port" + (f" (+{i})" if i else ""), t.prometheus_host, t.prometheus_port + i)
                for i in range(count)]
    return out


def check_ports_free(cfg: Config) -> None:
    """A launch refuses, before starting anything, a fixed port that another process holds."""
    for key, host, port in fixed_ports(cfg):
        if not 0 < port <= 65535:
            raise ConfigError(f"{key}: port {port} is outside 1..65535")
        if port_in_use(host, port):
            raise UserError(f"{key}: port {port} on {host} is already in use (free it or choose another port)")


def spec_for_launch(cfg: Config) -> ClusterSpec:
    """Addresses for a local launch: the YAML's fixed ports, free ones where none are given."""
    c = cfg.cluster
    ps_ports = c.ps_ports or [free_port(c.host) for _ in range(c.ps)]
    chief_port = c.chief_port or free_port(c.host)
    return ClusterSpec(chief=f"{c.host}:{chief_port}", ps=tuple(f"{c.host}:{p}" for p in ps_ports), workers=c.workers)


def bind_host(host: str) -> str:
    """Servers bind to an IP address as given; a name (a container's service name) binds on all
    interfaces, since the name resolves to an address of another network namespace's view."""
    return host if host.replace(".", "").isdigit() or host in ("localhost", "::1") else "0.0.0.0"
