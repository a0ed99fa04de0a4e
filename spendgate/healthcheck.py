"""``python -m spendgate.healthcheck HOST:PORT [--service NAME]``: one gRPC
health check, for container healthchecks (docker-compose.yml) where no
grpc_health_probe binary is at hand.

Exit status 0 when the service is SERVING; 1 when it is not, is unknown or
the server cannot be reached within ``--timeout`` seconds (the reason goes to
stderr). Service names: ``""`` is the whole process (both servers); ext_proc
also has ``spendgate.ControlPlaneSync`` and ``spendgate.UsageDelivery``
(docs/concepts/request-flow.md).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 2.0) -> str | None:
    """None if ``service`` at ``address`` is SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spendgate.healthcheck")
    parser.add_argument("address", help="host:port of a spendgate gRPC server")
    parser.add_argument("--service", default="", help='health service name (default "")')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    args = parser.parse_args(argv)
    problem = check(args.address, args.service, args.timeout)
    if problem is not None:
        print(f"{args.address} {args.service!r}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
