"""`python -m spendgate.healthcheck` (docker-compose healthchecks) against a
real gRPC health server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_proc.server import SYNC_HEALTH_SERVICE
from spendgate import healthcheck
from tests.harness import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(None)


def test_serving_exits_0(server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = server
    servicer.set("", SERVING)
    assert healthcheck.main([address]) == 0


@pytest.mark.parametrize(
    ("status", "service", "why"),
    [
        pytest.param(NOT_SERVING, "", "NOT_SERVING", id="not-serving"),
        pytest.param(SERVING, SYNC_HEALTH_SERVICE, "NOT_FOUND", id="unknown-service"),
    ],
)
def test_anything_else_exits_1_and_says_why(
    server: tuple[str, health.HealthServicer],
    capsys: pytest.CaptureFixture[str],
    status: int,
    service: str,
    why: str,
) -> None:
    address, servicer = server
    servicer.set("", status)
    args = [address] + (["--service", service] if service else [])
    assert healthcheck.main(args) == 1
    assert why in capsys.readouterr().err


def test_a_named_service(server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = server
    servicer.set(SYNC_HEALTH_SERVICE, SERVING)
    assert healthcheck.main([address, "--service", SYNC_HEALTH_SERVICE]) == 0
    servicer.set(SYNC_HEALTH_SERVICE, NOT_SERVING)
    assert healthcheck.check(address, SYNC_HEALTH_SERVICE) == "NOT_SERVING"


def test_nobody_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
