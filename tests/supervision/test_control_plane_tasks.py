"""Every supervised control plane task, broken on purpose in a real control
plane (in process, real gRPC server, SQLite and PostgreSQL): the failure is
logged at error level with what the task was doing, counted in
spendgate_task_failures_total{task}, shown by the health service that
depends on it (NOT_SERVING, then SERVING once it recovered), and the
restarted task works again."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from control_plane import server as server_module
from control_plane.config import Settings
from control_plane.replicas import CHANNEL, LISTEN_TASK, PUBLISH_TASK, libpq_url
from control_plane.server import (
    MAINTENANCE_HEALTH,
    MAINTENANCE_TASK,
    REPLICATION_HEALTH,
    WATCH_DATABASE_TASK,
    WEBHOOKS_HEALTH,
    ControlPlaneServer,
)
from control_plane.service import ControlPlane
from control_plane.webhooks.dispatcher import DELIVERY_TASK, DISPATCHER_TASK
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import reports_pb2 as rp
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.wire import timestamp
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    SECRETS_KEY,
    FakeClock,
    LoopThread,
    bearer,
    free_port,
    wait_until,
)
from tests.metrics.scrape import scrape
from tests.supervision.faults import (
    SERVING,
    Fault,
    HealthWatch,
    assert_failure_logged,
    captured_logs,
    check,
)
from tests.webhooks.receiver import Receiver

ADMIN = bearer(ADMIN_TOKEN)
DATA = bearer(DATA_PLANE_TOKEN)
USD = 1_000_000_000
WEBHOOKS: dict[str, Any] = {
    "webhook_allow_http": True,
    "webhook_allow_private_ranges": "127.0.0.0/8",
    "webhook_poll_interval_s": 0.05,
    # A claim's lease is twice the longest attempt: short, so a crashed
    # delivery is claimed again within seconds.
    "webhook_connect_timeout_s": 0.5,
    "webhook_read_timeout_s": 0.5,
}


@dataclass
class Running:
    loop: LoopThread
    server: ControlPlaneServer
    channel: grpc.Channel
    clock: FakeClock

    @property
    def cp(self) -> ControlPlane:
        return self.server.cp

    def failures(self, task: str) -> float:
        return scrape(self.server.metrics_port).value("spendgate_task_failures_total", task=task)

    def health(self, service: str) -> HealthWatch:
        return HealthWatch(self.server.port, service)


@pytest.fixture
def running(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    # The database is checked, and maintenance runs, every 0.2 s here (5 s
    # and 1 h in production): a restarted task shows it works within a second.
    monkeypatch.setattr(server_module, "HEALTH_INTERVAL_S", 0.2)
    monkeypatch.setattr(server_module, "MAINTENANCE_INTERVAL_S", 0.2)
    loop = LoopThread("supervised-control-plane")
    port = free_port()
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=db_url,
        admin_token=ADMIN_TOKEN,
        read_token=READ_TOKEN,
        data_plane_token=DATA_PLANE_TOKEN,
        metrics_listen="127.0.0.1:0",
        secrets_key=SECRETS_KEY,
        **WEBHOOKS,
    )
    clock = FakeClock()
    server = loop.call(lambda: ControlPlaneServer(settings, clock=clock))
    server.supervisor.min_backoff_s = 0.5  # broken long enough for a Watch to see
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(loop, server, channel, clock)
    finally:
        channel.close()
        loop.run(server.stop(grace=0))
        loop.stop()


def test_watch_database(running: Running) -> None:
    before = running.failures(WATCH_DATABASE_TASK)
    watch = running.health("")
    with captured_logs() as events:
        fault = Fault(running.cp, "ping", 2)
        try:
            wait_until(lambda: fault.spent, message="every injected failure")
            watch.wait_broken_then_serving()
            # Restarted, it checks the database again.
            wait_until(lambda: fault.calls_after > 0, message="a ping after the failures")
        finally:
            fault.undo()
            watch.close()
    assert_failure_logged(events, WATCH_DATABASE_TASK, 2, "database answers")
    assert running.failures(WATCH_DATABASE_TASK) == before + 2
    for service in server_module.DATABASE_SERVICES:
        assert check(running.server.port, service) == SERVING


def test_maintenance(running: Running) -> None:
    before = running.failures(MAINTENANCE_TASK)
    watch = running.health(MAINTENANCE_HEALTH)
    with captured_logs() as events:
        fault = Fault(running.cp, "forget_old_batches", 2)
        holds = Fault(running.cp, "forget_expired_holds", 0)  # counts the calls
        try:
            wait_until(lambda: fault.spent, message="every injected failure")
            watch.wait_broken_then_serving()
            # Restarted, a whole round runs again.
            wait_until(lambda: holds.calls_after > 0, message="a maintenance round")
        finally:
            fault.undo()
            holds.undo()
            watch.close()
    assert_failure_logged(events, MAINTENANCE_TASK, 2, "forgetting old usage batch ids")
    assert running.failures(MAINTENANCE_TASK) == before + 2
    assert check(running.server.port, "") == SERVING  # the API never left rotation


def _webhook_and_crossing(running: Running, receiver: Receiver) -> str:
    """A webhook, then usage crossing a policy's 50 % threshold: one
    delivery to send. Returns the policy id."""
    webhooks_pb2_grpc.WebhookServiceStub(running.channel).CreateWebhook(
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url)
        ),
        metadata=ADMIN,
        timeout=10,
    )
    policy = budget_pb2_grpc.BudgetServiceStub(running.channel).CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name="team",
                amount_usd="1",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                scope=pb.SCOPE_GLOBAL,
                action=pb.ACTION_ALERT,
                alert_thresholds=[50],
            )
        ),
        metadata=ADMIN,
        timeout=10,
    )
    dataplane_pb2_grpc.DataPlaneServiceStub(running.channel).ReportUsage(
        dp.ReportUsageRequest(
            data_plane_id="dp-1",
            batch_id=uuid.uuid4().hex,
            increments=[
                dp.SpendIncrement(
                    policy_id=policy.id,
                    window_start=timestamp(running.clock()),
                    cost_nanos=USD * 6 // 10,
                    request_count=1,
                )
            ],
        ),
        metadata=DATA,
        timeout=10,
    )
    return str(policy.id)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _delivered_threshold(receiver: Receiver, policy_id: str) -> None:
    [got] = receiver.wait_for(1, timeout=30)
    body = got.json()
    assert body["action"] == "threshold_crossed"
    assert body["data"]["policy_id"] == policy_id


def test_webhook_dispatcher(running: Running, receiver: Receiver) -> None:
    before = running.failures(DISPATCHER_TASK)
    watch = running.health(WEBHOOKS_HEALTH)
    with captured_logs() as events:
        fault = Fault(running.server.dispatcher, "dispatch_due", 3)
        try:
            policy_id = _webhook_and_crossing(running, receiver)
            wait_until(lambda: fault.spent, message="every injected failure")
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    _delivered_threshold(receiver, policy_id)  # the restarted dispatcher sent it
    assert_failure_logged(events, DISPATCHER_TASK, 3, "claiming due webhook deliveries")
    assert running.failures(DISPATCHER_TASK) == before + 3


def test_webhook_delivery(running: Running, receiver: Receiver) -> None:
    before = running.failures(DELIVERY_TASK)
    watch = running.health(WEBHOOKS_HEALTH)
    with captured_logs() as events:
        fault = Fault(running.server.dispatcher, "_attempt", 1)
        try:
            policy_id = _webhook_and_crossing(running, receiver)
            wait_until(lambda: fault.spent, message="the injected failure")
            # Its lease runs out, it is claimed and sent again: recovered.
            running.clock.advance(running.server.dispatcher.lease + timedelta(seconds=1))
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    _delivered_threshold(receiver, policy_id)
    assert fault.calls_after == 1
    assert_failure_logged(events, DELIVERY_TASK, 1, "sending webhook delivery")
    assert running.failures(DELIVERY_TASK) == before + 1


class StateStream:
    """A data plane's WatchState stream, read on a thread."""

    def __init__(self, running: Running) -> None:
        self.call = dataplane_pb2_grpc.DataPlaneServiceStub(running.channel).WatchState(
            dp.WatchStateRequest(data_plane_id="dp-watching"), metadata=DATA
        )
        self.updates: queue.Queue[dp.StateUpdate] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.updates.get(timeout=10).full_snapshot

    def _read(self) -> None:
        try:
            for update in self.call:
                self.updates.put(update)
        except grpc.RpcError:
            pass

    def next_policies(self, timeout: float = 30.0) -> dp.StateUpdate:
        while True:
            update = self.updates.get(timeout=timeout)
            if update.HasField("policies"):
                return update


def notify_from_another_replica(
    running: Running, kind: str = "policies", ids: tuple[str, ...] = ()
) -> None:
    """What another replica sends; with ``ids``, the changed policies (no ids:
    an earlier release's replica, which makes every stream resync)."""
    payload = {"r": "other-replica", "k": kind, **({"i": list(ids)} if ids else {})}
    with psycopg.connect(libpq_url(running.cp.engine), autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(payload)))


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_replica_listen(running: Running) -> None:
    replicas = running.server.replicas
    assert replicas is not None
    stream = StateStream(running)
    before = running.failures(LISTEN_TASK)
    watch = running.health(REPLICATION_HEALTH)
    with captured_logs() as events:
        fault = Fault(replicas, "_received", 1)
        try:
            notify_from_another_replica(running)
            wait_until(lambda: fault.spent, message="the injected failure")
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    # What it could not handle is covered by the resync after LISTEN is back...
    assert stream.next_policies()
    assert replicas.reconnects == 1
    # ... and it hears other replicas again.
    notify_from_another_replica(running)
    assert stream.next_policies()
    stream.call.cancel()
    assert_failure_logged(events, LISTEN_TASK, 1, "listening for other replicas")
    assert running.failures(LISTEN_TASK) == before + 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_replica_publish(running: Running) -> None:
    stream = StateStream(running)
    before = running.failures(PUBLISH_TASK)
    watch = running.health(REPLICATION_HEALTH)
    with captured_logs() as events:
        fault = Fault(running.cp, "publish_policies", 2)
        try:
            # A policy another replica changed (here: one that no longer exists).
            notify_from_another_replica(running, ids=("bp_changed_elsewhere",))
            wait_until(lambda: fault.spent, message="every injected failure")
            # The change it failed to publish is published by the restarted task.
            assert stream.next_policies()
            watch.wait_broken_then_serving()
        finally:
            fault.undo()
            watch.close()
    stream.call.cancel()
    assert_failure_logged(events, PUBLISH_TASK, 2, "publishing other replicas' changes")
    assert running.failures(PUBLISH_TASK) == before + 2


def test_maintenance_forgets_rollups_past_their_retention(running: Running) -> None:
    """The supervised maintenance task deletes chargeback rollups of hours
    older than report_retention_days (400 by default), and only those."""
    now = int(running.clock().timestamp()) // 3600 * 3600
    old, recent = now - 401 * 86400, now - 399 * 86400

    def rollup(hour: int) -> rp.UsageRollup:
        return rp.UsageRollup(hour=hour, user=f"u{hour}", cost_nanos=7, request_count=1)

    running.loop.run(
        running.cp.apply_usage(
            dp.ReportUsageRequest(
                data_plane_id="dp", batch_id="b-retention", rollups=[rollup(old), rollup(recent)]
            )
        )
    )

    def hours_left() -> list[str]:
        start = Timestamp(seconds=now - 500 * 86400)
        resp = running.loop.run(
            running.cp.query_spend(rp.QuerySpendRequest(group_by=["user"], start_time=start))
        )
        return [g.values[0] for g in resp.groups]

    wait_until(lambda: hours_left() == [f"u{recent}"], message="the old rollup forgotten")
