"""Durability: a control plane process killed (SIGKILL) while deliveries are
pending delivers them after it is started again. Real processes, real clock,
tiny backoffs from the settings."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.wire import timestamp
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    SECRETS_KEY,
    bearer,
    env_without_spendgate,
    free_port,
    wait_until,
)
from tests.webhooks.receiver import Receiver

ADMIN = bearer(ADMIN_TOKEN)


class Process:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "--config", str(config)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env_without_spendgate(),
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._out.closed:
            self._out.close()


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Iterator[tuple[Path, int]]:
    port = free_port()
    path = tmp_path / "spendgate.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "control_plane": {
                    "listen": f"127.0.0.1:{port}",
                    "database_url": db_url,
                    "admin_token": ADMIN_TOKEN,
                    "read_token": READ_TOKEN,
                    "data_plane_token": DATA_PLANE_TOKEN,
                    "secrets_key": SECRETS_KEY,
                    "metrics_listen": "",
                    "log_json": False,
                    "webhook_allow_http": True,
                    "webhook_allow_private_ranges": "127.0.0.0/8",
                    "webhook_backoff_base_s": 0.1,
                    "webhook_backoff_max_s": 0.3,
                    "webhook_connect_timeout_s": 0.5,
                    "webhook_read_timeout_s": 1.0,
                    "webhook_poll_interval_s": 0.05,
                    "webhook_max_attempts": 1000,
                }
            }
        )
    )
    yield path, port


def serving(channel: grpc.Channel) -> bool:
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="spendgate.v1.WebhookService"), timeout=1
        )
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def deliveries(channel: grpc.Channel) -> list[wpb.WebhookDelivery]:
    stub = webhooks_pb2_grpc.WebhookServiceStub(channel)
    return list(
        stub.ListDeliveries(wpb.ListDeliveriesRequest(), metadata=ADMIN, timeout=5).deliveries
    )


def test_pending_deliveries_survive_a_killed_control_plane(
    config: tuple[Path, int], tmp_path: Path
) -> None:
    path, port = config
    receiver = Receiver()  # down for now
    first = Process(path, tmp_path / "cp-1.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    second: Process | None = None
    try:
        wait_until(lambda: serving(channel), timeout=30, message="control plane serving")
        webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
        webhooks.CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url)
            ),
            metadata=ADMIN,
            timeout=10,
        )
        policy = budget_pb2_grpc.BudgetServiceStub(channel).CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name="cap",
                    amount_usd="1",
                    window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                    action=pb.ACTION_REJECT,
                    scope=pb.SCOPE_GLOBAL,
                )
            ),
            metadata=ADMIN,
            timeout=10,
        )
        dataplane_pb2_grpc.DataPlaneServiceStub(channel).ReportUsage(
            dp.ReportUsageRequest(
                data_plane_id="dp",
                batch_id="b1",
                increments=[
                    dp.SpendIncrement(
                        policy_id=policy.id,
                        window_start=timestamp(datetime.now(UTC)),
                        cost_nanos=2_000_000_000,
                        request_count=1,
                    )
                ],
            ),
            metadata=bearer(DATA_PLANE_TOKEN),
            timeout=10,
        )
        wait_until(
            lambda: deliveries(channel)[0].attempt_count >= 3,
            timeout=20,
            message="failed attempts while the receiver is down",
        )
        first.kill()
        receiver.start()
        second = Process(path, tmp_path / "cp-2.log")
        wait_until(lambda: serving(channel), timeout=30, message="control plane back")
        wait_until(
            lambda: deliveries(channel)[0].state == wpb.DELIVERY_STATE_DELIVERED,
            timeout=30,
            message="delivered after the restart",
        )
        (delivery,) = deliveries(channel)
        assert delivery.attempt_count >= 4
        assert delivery.last_status_code == 200
        assert [a.status_code for a in delivery.attempts][-1] == 200
        assert set(a.status_code for a in delivery.attempts[:-1]) == {0}
        (got,) = receiver.received()
        assert got.headers["webhook-id"] == delivery.id
        assert got.json()["data"]["policy_id"] == policy.id
    finally:
        channel.close()
        first.stop()
        if second is not None:
            second.stop()
        receiver.stop()
