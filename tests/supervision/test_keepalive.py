"""An idle state stream stays open: ext_proc's keepalive pings are accepted by
the control plane (no GOAWAY too_many_pings, no reconnection), and — the
control experiment — gRPC's server defaults do refuse them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.config import Settings as CPSettings
from control_plane.server import ControlPlaneServer
from ext_proc.config import Settings as EPSettings
from ext_proc.server import ExtProcServer
from spendgate import keepalive
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    FakeClock,
    LoopThread,
    free_port,
    wait_until,
)
from tests.supervision.faults import captured_logs

PING_MS = 100  # production: 10 s; the idle period below spans many pings
IDLE_S = 5.0
UNREACHABLE = "control plane unreachable; enforcing from last snapshot"


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[LoopThread, list[object]]]:
    loop = LoopThread("keepalive")
    started: list[object] = []
    yield loop, started
    for server in reversed(started):
        loop.run(server.stop(grace=0))  # type: ignore[attr-defined]
    loop.stop()


def start(tmp_path: Path, loop: LoopThread, started: list[object]) -> ExtProcServer:
    port = free_port()
    cp_settings = CPSettings(
        listen=f"127.0.0.1:{port}",
        database_url=f"sqlite:///{tmp_path}/cp.db",
        admin_token=ADMIN_TOKEN,
        read_token=READ_TOKEN,
        data_plane_token=DATA_PLANE_TOKEN,
        metrics_listen="",
    )
    clock = FakeClock()
    cp = loop.call(lambda: ControlPlaneServer(cp_settings, clock=clock))
    loop.run(cp.start())
    started.append(cp)
    ep_settings = EPSettings(
        listen="127.0.0.1:0",
        control_plane=f"127.0.0.1:{port}",
        data_plane_token=DATA_PLANE_TOKEN,
        data_plane_id="idle-dp",
        journal_dir=str(tmp_path / "journal"),
        metrics_listen="",
    )
    ext = loop.call(lambda: ExtProcServer(ep_settings, clock=clock))
    loop.run(ext.start())
    started.append(ext)
    wait_until(ext.sync.connected.is_set, message="connected")
    return ext


def unreachable(events: list[dict[str, object]]) -> int:
    return sum(1 for e in list(events) if e.get("event") == UNREACHABLE)


def test_an_idle_state_stream_is_never_refused(
    tmp_path: Path, services: tuple[LoopThread, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keepalive, "CLIENT_PING_INTERVAL_MS", PING_MS)
    with captured_logs() as events:
        ext = start(tmp_path, *services)
        time.sleep(IDLE_S)  # nothing to send: only pings cross the connection
        assert ext.sync.connected.is_set()
    assert unreachable(events) == 0
    disconnects = [e for e in events if e.get("event") == "data plane disconnected"]
    assert disconnects == []


def test_the_servers_defaults_would_refuse_those_pings(
    tmp_path: Path, services: tuple[LoopThread, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keepalive, "CLIENT_PING_INTERVAL_MS", PING_MS)
    monkeypatch.setattr(keepalive, "server_options", lambda: [])
    with captured_logs() as events:
        start(tmp_path, *services)
        wait_until(lambda: unreachable(events), timeout=30, message="GOAWAY too_many_pings")
