"""Shared fixtures: databases (SQLite and the local PostgreSQL) and the
whole stack (fake provider, control plane, ext_proc, real Envoy)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control_plane.config import Settings as CPSettings
from control_plane.server import ControlPlaneServer
from ext_proc.config import Settings as EPSettings
from ext_proc.server import ExtProcServer
from spendgate import envoy_config
from spendgate.demo.fake_provider import FakeProviderServer
from spendgate.v1 import budget_pb2_grpc
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    SECRETS_KEY,
    EnvoyProcess,
    FakeClock,
    LoopThread,
    free_port,
    grpc_channel,
    tempdir,
)

PG_ADMIN_URL = os.environ.get("SPENDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.OperationalError as e:
        return str(e)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server; in CI its absence fails the run instead of skipping."""
    problem = _pg_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"spendgate_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spendgate.db"
    return str(request.getfixturevalue("pg_url"))


@dataclass
class Stack:
    clock: FakeClock
    provider: FakeProviderServer
    cp: ControlPlaneServer
    ext: ExtProcServer
    envoy: EnvoyProcess
    loop: LoopThread
    budgets: budget_pb2_grpc.BudgetServiceStub
    workdir: Path

    @property
    def admin(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def start_stack(
    database_url: str | None = None,
    *,
    clock: FakeClock | None = None,
    control_plane: Mapping[str, Any] | None = None,
    ext_proc: Mapping[str, Any] | None = None,
    envoy: Callable[[dict[str, Any]], None] | None = None,
) -> Stack:
    """The whole stack; ``control_plane`` / ``ext_proc`` override settings,
    ``envoy`` edits the Envoy bootstrap in memory (e.g. adds jwt_authn).

    Metrics are off unless asked for (``metrics_listen="127.0.0.1:0"``): the
    default ports would collide between stacks."""
    workdir = tempdir()
    clock = clock or FakeClock()
    provider = FakeProviderServer()
    provider.start_in_thread()
    loop = LoopThread("spendgate-services")
    cp_port, ep_port = free_port(), free_port()
    cp = loop.call(
        lambda: ControlPlaneServer(
            CPSettings(
                listen=f"127.0.0.1:{cp_port}",
                database_url=database_url or f"sqlite:///{workdir}/spendgate.db",
                admin_token=ADMIN_TOKEN,
                read_token=READ_TOKEN,
                data_plane_token=DATA_PLANE_TOKEN,
                **{"metrics_listen": "", "secrets_key": SECRETS_KEY, **(control_plane or {})},
            ),
            clock=clock,
        )
    )
    loop.run(cp.start())
    ext = loop.call(
        lambda: ExtProcServer(
            EPSettings(
                listen=f"127.0.0.1:{ep_port}",
                control_plane=f"127.0.0.1:{cp_port}",
                data_plane_token=DATA_PLANE_TOKEN,
                data_plane_id="test-dp",
                flush_interval_ms=20,
                journal_dir=str(workdir / "journal"),
                # Tests name callers in identity headers, sent from loopback.
                **{
                    "metrics_listen": "",
                    "trusted_header_sources": "127.0.0.1/32",
                    **(ext_proc or {}),
                },
            ),
            clock=clock,
        )
    )
    loop.run(ext.start())
    config = envoy_config.adapt(
        envoy_config.load(),
        ext_proc=("127.0.0.1", ep_port),
        providers_to=("127.0.0.1", provider.port),
        demo_to=("127.0.0.1", provider.port),
    )
    if envoy is not None:
        envoy(config)
    envoy_proc = EnvoyProcess(config, workdir)
    budgets = budget_pb2_grpc.BudgetServiceStub(grpc_channel(cp_port))
    return Stack(clock, provider, cp, ext, envoy_proc, loop, budgets, workdir)


def stop_stack(stack: Stack) -> None:
    stack.envoy.stop()
    stack.loop.run(stack.ext.stop(grace=1))
    stack.loop.run(stack.cp.stop(grace=1))
    stack.loop.stop()
    stack.provider.shutdown()
    stack.provider.server_close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = start_stack()
    yield s
    stop_stack(s)
