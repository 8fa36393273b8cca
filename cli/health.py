"""`asyncps health HOST:PORT`: exit 0 when the server's gRPC health service answers SERVING.

Made for container health checks (docker-compose `healthcheck`, Kubernetes `exec` probes): one
`grpc.health.v1.Health/Check` call with a deadline. Exit codes: 0 SERVING; 1 anything else (not
serving yet, unreachable, no health service, deadline exceeded), with one line saying which.
"""
from __future__ import annotations

import argparse
import sys

from asyncps.errors import UserError

DEFAULT_TIMEOUT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser, _name: str) -> None:
    parser.add_argument("address", help="the server's HOST:PORT (e.g. ps0:2222, 127.0.0.1:2222)")
    parser.add_argument("--service", default="",
                        help="the health service name to ask about (default '': the server as a whole)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    serving, status = check_health(args.address, args.service, args.timeout)
    print(f"{args.address}: {status}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


def check_health(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """(True, "SERVING") when `address` reports SERVING for `service`; else (False, what it said)."""
    _check_address(address)
    if timeout <= 0:
        raise UserError(f"--timeout must be positive, got {timeout:g}")
    import grpc  # imported here: `asyncps --help` must not pay for grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from asyncps.protos.security import open_channel  # TLS and token from ASYNCPS_TLS_* / ASYNCPS_TOKEN

    with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # types-grpcio-health-checking declares HealthStub without the methods it sets in __init__
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)  # type: ignore[attr-defined]
        except grpc.RpcError as exc:
            return False, f"{exc.code().name} ({exc.details()})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"address {address!r}: expected HOST:PORT with a port in 1-65535 (e.g. ps0:2222)")
