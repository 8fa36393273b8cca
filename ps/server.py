"""The shard process: a gRPC server with the ParameterServer and health services.

    python -m asyncps.ps.server CONFIG --index 0 [--port 0] [--host 127.0.0.1] [--port-file F] [key=value ...]

prints ``asyncps ps 0: serving on 127.0.0.1:PORT`` and, with ``--port-file``, writes the bound
port (atomically) to F, so a launcher can ask for port 0 and learn the port the OS chose. The
health service (``grpc.health.v1.Health``) reports SERVING for "" and "asyncps.ParameterServer"
once the server is listening. SIGTERM, SIGINT or the Stop RPC shut it down gracefully: health
goes NOT_SERVING, waiting calls fail with UNAVAILABLE, in-flight calls get `grace` seconds.

Create gRPC objects only inside the process that uses them: build a `ShardServer` after the
process has started, never before a fork.
"""
from __future__ import annotations

import logging
import argparse
import signal
import sys
import threading


from asyncps.config import Config, load_config
from asyncps.errors import UserError
from asyncps.logs import configure as configure_logging
from asyncps.protos.rpc import ps_handler
from asyncps.protos.serving import STREAM_IDLE_TIMEOUT, RoleServer, StreamLimits
from asyncps.ps import counters
from asyncps.ps.servicer import SERVICE_NAME, ParameterServerServicer
from asyncps.ps.shard import Shard
from asyncps.update_log import open_shard_log
from asyncps.telemetry import FunctionCollector, MetricsServer, metrics_port

logger = logging.getLogger(__name__)
DEFAULT_GRACE = 5.0  # seconds in-flight calls get at shutdown
STREAMS_PER_PEER = 4  # request streams open at once on one connection


def stream_limits(cfg: Config) -> StreamLimits:
    """A shard's limits on request streams (Push, PushPull, Init, Restore; protos/serving.py):
    2 * workers + 8 open at once (each with a thread of its own, on top of the threads of unary
    calls and pulls), 4 per connection, STREAM_IDLE_TIMEOUT between messages, and 4 *
    rpc_timeout in all for a caller that set no deadline."""
    return StreamLimits(max_streams=2 * cfg.cluster.workers + 8, per_peer=STREAMS_PER_PEER,
                        idle_timeout=STREAM_IDLE_TIMEOUT, max_duration=4 * cfg.cluster.rpc_timeout)


class ShardServer:
    """One shard behind a gRPC server: `start()`, then `wait()` or `stop()`.

    ``stop_requested`` is set by the Stop RPC or by `request_stop` (the SIGTERM handler).
    `streams`: limits on request streams (default `stream_limits(cfg)`); `push_bytes`: bytes of
    streamed pushes held at once (default: sized from the variables, ps/servicer.py ByteBudget).
    """

    def __init__(self, cfg: Config, index: int = 0, port: int = 0, host: str = "127.0.0.1", shard: Shard | None = None,
                 streams: StreamLimits | None = None, push_bytes: int | None = None):
        self.cfg, self.index = cfg, index
        self.update_log = None if shard else open_shard_log(cfg, index)  # for `asyncps replay`
        self.shard = shard or Shard.from_config(cfg, index, update_log=self.update_log)
        self.stop_requested = threading.Event()
        self._grace = DEFAULT_GRACE
        # Threads: every in-flight call holds one, and ssp/sync pulls may wait in theirs; request
        # streams get max_streams more of their own, so idle streams never take the others.
        self._role = RoleServer(f"ps {index}", host, port, (SERVICE_NAME,),
                                max_workers=max(16, 2 * cfg.cluster.workers + 8), security=cfg.cluster.security,
                                streams=streams or stream_limits(cfg))
        self.server = self._role.server
        self.shm = make_shm_endpoint(cfg, self.shard, self._role.security.token)  # cluster.transport
        self.servicer = ParameterServerServicer(self.shard, self.request_stop, push_bytes=push_bytes, shm=self.shm)
        self.server.add_generic_rpc_handlers((ps_handler(self.servicer),))
        self.streams = self._role.streams  # the StreamGuard: counts of refused and ended streams
        self.port = 0

    def start(self) -> int:
        """Binds, starts serving, flips health to SERVING; returns the bound port."""
        self.port = self._role.start()
        return self.port

    def request_stop(self, grace: float | None = None) -> None:
        """Asks `wait` to shut the server down (safe from a handler or a signal)."""
        if grace is not None and grace > 0:
            self._grace = grace
        self.stop_requested.set()

    def wait(self) -> None:
        """Blocks until a stop is requested, then shuts down gracefully."""
        self.stop_requested.wait()
        self.stop()

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, waiting calls woken with UNAVAILABLE, then stop with `grace`."""
        self._role.health.enter_graceful_shutdown()
        self.shard.stop()
        if self.streams is not None:  # workers' sessions idle between steps: end them, or they hold the grace
            self.streams.end(f"/{SERVICE_NAME}/PushPullSession", "the shard is stopping")
        self._role.stop(self._grace if grace is None else grace)
        if self.shm is not None:
            self.shm.close()  # unlinks segments whose handshake did not complete, unmaps the rest
        if self.update_log is not None:
            self.update_log.close()


def make_shm_endpoint(cfg: Config, shard: Shard, token: str | None):
    """The shared-memory endpoint (ps/shm_transport.py) unless cluster.transport is grpc or this
    host has no /dev/shm; segment names carry the run's prefix (asyncps.shm.prefix_for) and the
    shard's index."""
    from asyncps import shm

    if getattr(cfg.cluster, "transport", "grpc") == "grpc" or not shm.available():
        return None
    from asyncps.ps.shm_transport import ShmEndpoint

    prefix = f"{shm.prefix_for(cfg.run_dir)}ps{shard.index}-"
    shm.remove_segments(prefix)  # left by a predecessor of this shard that was SIGKILLed mid-handshake
    return ShmEndpoint(shard, prefix, token)


def serve(cfg: Config, index: int, port: int = 0, host: str = "127.0.0.1", port_file: str | None = None) -> int:
    """Runs shard `index` until SIGTERM/SIGINT or the Stop RPC; returns the exit code (0).

    Port 0 asks the OS for a free port; the chosen one is printed and, if `port_file` is given,
    written there (atomically), for launchers.
    """
    counters.set_recording(cfg.telemetry.record_staleness)
    server = ShardServer(cfg, index, port, host)
    server.shard.cap_at(cfg.train.max_steps)  # max_steps means updates applied: exactly that many
    server.shard.keep_milestones(cfg.train.eval_every)  # the chief evaluates exactly these versions
    bound = server.start()
    metrics = start_metrics(server.shard, cfg, index, server._role.refusals)
    signals: list[int] = []  # a signal, not the chief's Stop RPC: exit 128 + signal, so a launcher restarts it

    def on_signal(signum: int, _frame) -> None:
        signals.append(signum)
        server.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    logger.info(f"asyncps ps {index}: serving on {host}:{bound} (mode {cfg.cluster.mode})")
    if port_file:
        from asyncps.atomic import atomic_write_bytes

        atomic_write_bytes(port_file, f"{bound}\n".encode())
    server.wait()
    if metrics is not None:
        metrics.stop()
    logger.info(f"asyncps ps {index}: stopped at version {server.shard.version}")
    return 128 + signals[0] if signals else 0


def start_metrics(shard: Shard, cfg: Config, index: int, refusals=None) -> MetricsServer | None:
    """The shard's /metrics endpoint (ps/metrics.py) on `telemetry.prometheus_port + 1 + index`,
    with the calls its server refused (`refusals`, protos/security.py); None when off (port 0) or
    unavailable."""
    t = cfg.telemetry
    port = metrics_port(t.prometheus_port, "ps", index, cfg.cluster.ps)
    if not port:
        return None
    from asyncps.ps.metrics import refusal_families, shard_families

    collectors = [FunctionCollector(lambda: shard_families(shard.stats()))]
    if refusals is not None:
        collectors.append(FunctionCollector(lambda: refusal_families(refusals, index)))
    server = MetricsServer.start(collectors, port,
                                 t.prometheus_host, who=f"ps {index}")
    if server is not None:
        logger.info(f"asyncps ps {index}: metrics on http://{t.prometheus_host}:{server.port}/metrics")
    return server


def main(argv: list[str] | None = None) -> int:
    """Command line of one shard process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m asyncps.ps.server", description="Run one parameter-server shard.")
    parser.add_argument("config", help="run YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--index", type=int, default=0, help="shard index (default 0)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port-file", default=None, help="write the bound port to this file")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    configure_logging(role_process=True)
    try:
        cfg = load_config(args.config, args.overrides)
        if not 0 <= args.index < cfg.cluster.ps:
            raise UserError(f"--index {args.index} is outside the cluster's {cfg.cluster.ps} shards (cluster.ps)")
        return serve(cfg, args.index, args.port, args.host, args.port_file)
    except UserError as err:
        print(f"asyncps ps: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
