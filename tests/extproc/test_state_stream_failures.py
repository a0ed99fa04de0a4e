"""A data plane that cannot sync says so at once: a warning line, the
spendgate.ControlPlaneSync health NOT_SERVING and the failure metric; also
when it started from its saved snapshot. The control plane here is a fake
DataPlaneService that misbehaves in one chosen way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc.config import Settings
from ext_proc.server import SYNC_HEALTH_SERVICE, ExtProcServer
from ext_proc.sync import snapshot
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import dataplane_pb2_grpc
from tests.harness import DATA_PLANE_TOKEN, LoopThread, free_port, grpc_channel, wait_until
from tests.metrics.scrape import scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def policy(pid: str) -> pb.BudgetPolicy:
    return pb.BudgetPolicy(
        id=pid,
        name=pid,
        amount_usd="1",
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        timezone="UTC",
        action=pb.ACTION_REJECT,
        scope=pb.SCOPE_GLOBAL,
        enabled=True,
    )


class FakeControlPlane(dataplane_pb2_grpc.DataPlaneServiceServicer):
    """``oversized``: an earlier release's whole snapshot past gRPC's 4 MB;
    ``gap``: a resync, then a change that skips a number."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.streams = 0

    async def WatchState(
        self, request: dp.WatchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dp.StateUpdate]:
        self.streams += 1
        if self.mode == "oversized":
            huge = policy("bp_huge")
            huge.description = "x" * (5 << 20)
            yield dp.StateUpdate(full_snapshot=True, policies=dp.PolicySnapshot(policies=[huge]))
            return
        yield dp.StateUpdate(
            resync=dp.ResyncPage(page=0, last=True),
            seq=5,
            policy_changes=dp.PolicyChanges(
                upserts=[dp.VersionedPolicy(policy=policy("bp_live"), version=1)]
            ),
        )
        await asyncio.sleep(0.2)
        yield dp.StateUpdate(seq=7)  # change 6 never came
        await asyncio.sleep(30)


class Env:
    def __init__(self, mode: str, journal: Path) -> None:
        self.loop = LoopThread("state-stream-failures")
        self.fake = FakeControlPlane(mode)
        port = free_port()

        def make_server() -> grpc.aio.Server:
            server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
            dataplane_pb2_grpc.add_DataPlaneServiceServicer_to_server(  # type: ignore[no-untyped-call]
                self.fake, server
            )
            server.add_insecure_port(f"127.0.0.1:{port}")
            return server

        self.server = self.loop.call(make_server)
        self.loop.run(self.server.start())
        settings = Settings(
            listen="127.0.0.1:0",
            control_plane=f"127.0.0.1:{port}",
            data_plane_token=DATA_PLANE_TOKEN,
            data_plane_id="dp-failing",
            journal_dir=str(journal),
            metrics_listen="127.0.0.1:0",
        )
        self.ext = self.loop.call(lambda: ExtProcServer(settings))

    def start(self) -> None:
        self.loop.run(self.ext.start())

    def health(self) -> int:
        with grpc_channel(self.ext.port) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SYNC_HEALTH_SERVICE), timeout=5
            )
        return int(resp.status)

    def close(self) -> None:
        self.loop.run(self.ext.stop(grace=0))
        self.loop.run(self.server.stop(0))
        self.loop.stop()


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def warnings_of(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [
        e
        for e in list(logs)
        if e["log_level"] == "warning" and e["event"].startswith("state stream")
    ]


def test_a_restarted_ext_proc_that_cannot_sync_warns_at_once_and_says_so(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    # What an earlier run saved: enforced at once after the restart.
    snapshot.save(journal, dp.StateUpdate(policies=dp.PolicySnapshot(policies=[policy("bp_s")])))
    env = Env("oversized", journal)
    try:
        assert list(env.ext.state.index.policies) == ["bp_s"]
        env.start()
        [first, *_] = wait_until(lambda: warnings_of(logs), message="a warning")
        assert first["reason"] == "stream" and "RESOURCE_EXHAUSTED" in first["detail"]
        assert env.health() == NOT_SERVING
        wait_until(lambda: env.fake.streams >= 3, message="retries")
        assert len(warnings_of(logs)) == 1  # once, not at every retry
        # The third stream has opened; its failure is counted once it ends.
        metrics = wait_until(
            lambda: (
                (m := scrape(env.ext.metrics_port)).value(
                    "spendgate_ext_proc_state_stream_failures_total", reason="stream"
                )
                >= 3
                and m
            ),
            message="three failures counted",
        )
        assert metrics.value("spendgate_ext_proc_control_plane_connected") == 0
        assert list(env.ext.state.index.policies) == ["bp_s"]  # still enforcing
    finally:
        env.close()


def test_a_missed_change_is_a_warning_and_a_resync(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    env = Env("gap", tmp_path / "journal")
    try:
        env.start()
        [first, *_] = wait_until(lambda: warnings_of(logs), message="a warning")
        assert first["reason"] == "gap" and "expected change 6" in first["detail"]
        wait_until(lambda: env.fake.streams >= 2, message="a new stream: a resync")
        assert env.ext.sync.stream_stats.resyncs >= 2
        assert list(env.ext.state.index.policies) == ["bp_live"]
        assert (
            scrape(env.ext.metrics_port).value(
                "spendgate_ext_proc_state_stream_failures_total", reason="gap"
            )
            >= 1
        )
        # While the stream is down after each gap, health says so.
        wait_until(lambda: env.health() == NOT_SERVING, message="NOT_SERVING after a gap")
        wait_until(lambda: env.health() == SERVING, message="SERVING after the resync")
    finally:
        env.close()
