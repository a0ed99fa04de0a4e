"""Fixtures for the webhook tests: settings that allow the local receivers
(through the SSRF allowlist settings, not a bypass), a control plane driven
directly with a FakeClock, and real HTTP receivers."""

from __future__ import annotations

import contextlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine

from control_plane import keyring
from control_plane.config import Settings
from control_plane.hub import StateHub
from control_plane.keyring import Keyring
from control_plane.server import ControlPlaneServer
from control_plane.service import ControlPlane
from control_plane.store.db import create_db_engine, migrate
from control_plane.webhooks.dispatcher import Dispatcher
from control_plane.webhooks.sender import Sender
from control_plane.webhooks.service import WebhookAdmin
from control_plane.webhooks.ssrf import Resolver, UrlPolicy, system_resolver
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.wire import timestamp
from tests.conftest import Stack, start_stack
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    SECRETS_KEY,
    FakeClock,
    LoopThread,
    bearer,
    free_port,
)
from tests.webhooks.receiver import Receiver

USD = 1_000_000_000
# Deterministic retries: no jitter, 1 s base doubling to 8 s.
FAST: dict[str, Any] = {
    "webhook_allow_http": True,
    "webhook_allow_private_ranges": "127.0.0.0/8",
    "webhook_backoff_base_s": 1.0,
    "webhook_backoff_max_s": 8.0,
    "webhook_backoff_jitter": 0.0,
    "webhook_connect_timeout_s": 2.0,
    "webhook_read_timeout_s": 2.0,
    "webhook_poll_interval_s": 0.05,
}


def settings(database_url: str = "sqlite://", **overrides: Any) -> Settings:
    values = {
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "read_token": READ_TOKEN,
        "data_plane_token": DATA_PLANE_TOKEN,
        "metrics_listen": "",
        "secrets_key": SECRETS_KEY,
        **FAST,
        **overrides,
    }
    return Settings(**values)


def recent_instant() -> datetime:
    """Now, or 4 minutes before the end of this hour if later: within the
    5 minutes signature checkers allow, and clear of the hour's end so a test
    can move the clock a little and stay in the same hourly window."""
    now = datetime.now(UTC).replace(microsecond=0)
    return min(now, now.replace(minute=56, second=0))


@dataclass
class Rig:
    """A control plane with its webhook admin and dispatcher, no gRPC."""

    cp: ControlPlane
    admin: WebhookAdmin
    dispatcher: Dispatcher
    sender: Sender
    clock: FakeClock
    engine: Engine
    settings: Settings
    batches: Iterator[int]
    keyring: Keyring | None

    async def policy(
        self,
        amount: str = "10",
        *,
        thresholds: tuple[int, ...] = (),
        action: int = pb.ACTION_REJECT,
        scope: int = pb.SCOPE_GLOBAL,
        target: str = "",
        name: str = "",
        unit: int = pb.WINDOW_UNIT_HOURS,
    ) -> pb.BudgetPolicy:
        return await self.cp.create_policy(
            pb.BudgetPolicy(
                # Names are unique per control plane: each default one is new.
                name=name or f"team budget {uuid.uuid4().hex[:8]}",
                amount_usd=amount,
                window=pb.BudgetWindow(unit=unit, count=1),
                action=action,
                scope=scope,
                target=target,
                alert_thresholds=thresholds,
            ),
            "admin",
        )

    async def spend(self, policy_id: str, nanos: int, member: str = "") -> None:
        await self.cp.apply_usage(
            dp.ReportUsageRequest(
                data_plane_id="dp-1",
                batch_id=f"b{next(self.batches)}",
                increments=[
                    dp.SpendIncrement(
                        policy_id=policy_id,
                        member=member,
                        window_start=timestamp(self.clock()),
                        cost_nanos=nanos,
                        request_count=1,
                    )
                ],
            )
        )

    async def webhook(self, url: str, **fields: Any) -> wpb.Webhook:
        fields.setdefault("name", f"ops-{uuid.uuid4().hex[:8]}")  # names are unique
        fields.setdefault("format", wpb.WEBHOOK_FORMAT_GENERIC)
        return await self.admin.create_webhook(wpb.Webhook(url=url, **fields), "admin")

    async def deliveries(self, **filters: Any) -> list[wpb.WebhookDelivery]:
        out, token = await self.admin.list_deliveries(
            wpb.ListDeliveriesRequest(page_size=1000, **filters)
        )
        assert token == ""
        return out

    async def one_delivery(self) -> wpb.WebhookDelivery:
        (d,) = await self.deliveries()
        return d


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(recent_instant())


@contextlib.asynccontextmanager
async def make_rig(
    database_url: str, clock: FakeClock, resolver: Resolver = system_resolver, **overrides: Any
) -> AsyncIterator[Rig]:
    s = settings(database_url, **overrides)
    keys = keyring.load(s.secrets_key_file, s.secrets_key)
    engine = create_db_engine(database_url)
    migrate(engine, keys)
    cp = ControlPlane(engine, StateHub(), clock=clock)
    policy = UrlPolicy.from_settings(s)
    sender = Sender(
        policy,
        connect_timeout_s=s.webhook_connect_timeout_s,
        read_timeout_s=s.webhook_read_timeout_s,
        resolver=resolver,
    )
    dispatcher = Dispatcher(cp, sender, s, clock=clock, keyring=keys, rng=random.Random(7))
    try:
        yield Rig(
            cp,
            WebhookAdmin(cp, policy, sender, keys),
            dispatcher,
            sender,
            clock,
            engine,
            s,
            itertools.count(),
            keys,
        )
    finally:
        await dispatcher.stop(0)
        await sender.aclose()
        cp.close()


@pytest.fixture
async def rig(db_url: str, clock: FakeClock) -> AsyncIterator[Rig]:
    async with make_rig(db_url, clock) as r:
        yield r


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@dataclass
class Api:
    """A ControlPlaneServer on its own loop thread, with sync stubs."""

    loop: LoopThread
    server: ControlPlaneServer
    channel: grpc.Channel
    webhooks: webhooks_pb2_grpc.WebhookServiceStub
    budgets: budget_pb2_grpc.BudgetServiceStub
    dataplane: dataplane_pb2_grpc.DataPlaneServiceStub
    clock: FakeClock

    def report(self, policy_id: str, nanos: int, member: str = "") -> dp.ReportUsageResponse:
        return self.dataplane.ReportUsage(
            dp.ReportUsageRequest(
                data_plane_id="dp-test",
                batch_id=f"api-{uuid.uuid4().hex}",  # unique across servers
                increments=[
                    dp.SpendIncrement(
                        policy_id=policy_id,
                        member=member,
                        window_start=timestamp(self.clock()),
                        cost_nanos=nanos,
                        request_count=1,
                    )
                ],
            ),
            metadata=bearer(DATA_PLANE_TOKEN),
            timeout=10,
        )

    def policy(self, amount: str = "1", **fields: Any) -> pb.BudgetPolicy:
        fields.setdefault("name", "api budget")
        fields.setdefault("window", pb.BudgetWindow(unit=pb.WINDOW_UNIT_HOURS, count=1))
        fields.setdefault("action", pb.ACTION_REJECT)
        fields.setdefault("scope", pb.SCOPE_GLOBAL)
        return self.budgets.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(amount_usd=amount, **fields)),
            metadata=bearer(ADMIN_TOKEN),
            timeout=10,
        )

    def deliveries(self, **filters: Any) -> list[wpb.WebhookDelivery]:
        resp = self.webhooks.ListDeliveries(
            wpb.ListDeliveriesRequest(page_size=1000, **filters),
            metadata=bearer(ADMIN_TOKEN),
            timeout=10,
        )
        return list(resp.deliveries)


@contextlib.contextmanager
def running_api(
    database_url: str,
    clock: FakeClock,
    resolver: Resolver = system_resolver,
    **overrides: Any,
) -> Iterator[Api]:
    loop = LoopThread("webhook-api-under-test")
    port = free_port()
    s = settings(database_url, listen=f"127.0.0.1:{port}", **overrides)
    try:
        server = loop.call(lambda: ControlPlaneServer(s, clock=clock, resolver=resolver))
        loop.run(server.start())
    except BaseException:
        loop.stop()
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Api(
            loop,
            server,
            channel,
            webhooks_pb2_grpc.WebhookServiceStub(channel),
            budget_pb2_grpc.BudgetServiceStub(channel),
            dataplane_pb2_grpc.DataPlaneServiceStub(channel),
            clock,
        )
    finally:
        channel.close()
        loop.run(server.stop(grace=0))
        loop.stop()


@pytest.fixture
def api(db_url: str, clock: FakeClock) -> Iterator[Api]:
    with running_api(db_url, clock) as a:
        yield a


def start_stack_with_webhooks(clock: FakeClock | None = None) -> Stack:
    """tests.conftest.start_stack, with the webhook settings the local
    receivers need (stop it with tests.conftest.stop_stack)."""
    return start_stack(clock=clock, control_plane=FAST)
