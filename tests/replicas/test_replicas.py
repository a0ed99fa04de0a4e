"""Two control plane replicas on one PostgreSQL database: a change made through
replica A reaches a data plane watching replica B within a second (policies,
spend, price overrides), through LISTEN/NOTIFY, also after B's listener
connection was killed."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import psycopg
import pytest

from control_plane.config import Settings
from control_plane.replicas import MAX_PAYLOAD_BYTES, encode
from control_plane.server import ControlPlaneServer
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc, dataplane_pb2_grpc, pricing_pb2_grpc
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp
from tests.harness import (
    ADMIN_TOKEN,
    DATA_PLANE_TOKEN,
    READ_TOKEN,
    FakeClock,
    LoopThread,
    bearer,
    free_port,
)

pytestmark = pytest.mark.postgres

T0 = datetime(2025, 3, 10, 12, 17, 30, tzinfo=UTC)
ADMIN = bearer(ADMIN_TOKEN)
DATA = bearer(DATA_PLANE_TOKEN)
BOUND_S = 1.0  # the promise: a change anywhere reaches every data plane within this
RECONNECT_S = 10.0  # generous: backoff plus a fresh connection


@dataclass
class Replica:
    loop: LoopThread
    server: ControlPlaneServer
    channel: grpc.Channel
    budgets: budget_pb2_grpc.BudgetServiceStub
    dataplane: dataplane_pb2_grpc.DataPlaneServiceStub
    pricing: pricing_pb2_grpc.PricingServiceStub


@contextlib.contextmanager
def replica(database_url: str, clock: FakeClock) -> Iterator[Replica]:
    loop = LoopThread("replica-under-test")
    port = free_port()
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        read_token=READ_TOKEN,
        data_plane_token=DATA_PLANE_TOKEN,
        metrics_listen="",
    )
    try:
        server = loop.call(lambda: ControlPlaneServer(settings, clock=clock))
        loop.run(server.start())
    except BaseException:
        loop.stop()
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Replica(
            loop,
            server,
            channel,
            budget_pb2_grpc.BudgetServiceStub(channel),
            dataplane_pb2_grpc.DataPlaneServiceStub(channel),
            pricing_pb2_grpc.PricingServiceStub(channel),
        )
    finally:
        channel.close()
        loop.run(server.stop(grace=0))
        loop.stop()


class Watch:
    """A data plane's WatchState stream, read on a thread so reads have deadlines."""

    def __init__(self, r: Replica) -> None:
        self.call = r.dataplane.WatchState(
            dp.WatchStateRequest(data_plane_id="dp-on-b"), metadata=DATA
        )
        self.updates: queue.Queue[dp.StateUpdate | grpc.RpcError] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.updates.get(timeout=10)
        assert isinstance(first, dp.StateUpdate) and first.full_snapshot

    def _read(self) -> None:
        try:
            for update in self.call:
                self.updates.put(update)
        except grpc.RpcError as e:
            self.updates.put(e)

    def wait_for(
        self, match: Callable[[dp.StateUpdate], bool], deadline_s: float, since: float
    ) -> dp.StateUpdate:
        """The first update that matches, read before ``since + deadline_s``
        (monotonic); fails the test otherwise."""
        deadline = since + deadline_s
        while True:
            left = deadline - time.monotonic()
            try:
                item = self.updates.get(timeout=max(left, 0.0))
            except queue.Empty:
                pytest.fail(f"no matching update within {deadline_s} s")
            if isinstance(item, grpc.RpcError):
                raise item
            if match(item):
                return item

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[Replica, Replica, Watch]]:
    clock = FakeClock(T0)
    with replica(pg_url, clock) as a, replica(pg_url, clock) as b:
        watch = Watch(b)
        try:
            yield a, b, watch
        finally:
            watch.close()


def create_policy(r: Replica, name: str, amount: str = "10.00") -> pb.BudgetPolicy:
    return r.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name=name,
                amount_usd=amount,
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_HOURS, count=1),
                action=pb.ACTION_REJECT,
                scope=pb.SCOPE_GLOBAL,
            )
        ),
        metadata=ADMIN,
        timeout=10,
    )


def has_policy(name: str) -> Callable[[dp.StateUpdate], bool]:
    return lambda u: u.HasField("policies") and any(p.name == name for p in u.policies.policies)


def report(r: Replica, policy_id: str, nanos: int) -> dp.ReportUsageResponse:
    return r.dataplane.ReportUsage(
        dp.ReportUsageRequest(
            data_plane_id="dp-on-a",
            batch_id=f"b-{uuid.uuid4().hex}",
            increments=[
                dp.SpendIncrement(
                    policy_id=policy_id,
                    window_start=timestamp(T0),
                    cost_nanos=nanos,
                    request_count=1,
                )
            ],
        ),
        metadata=DATA,
        timeout=10,
    )


def test_policy_created_on_a_reaches_b_within_a_second(
    two: tuple[Replica, Replica, Watch],
) -> None:
    a, _, watch = two
    create_policy(a, "made on a")
    done = time.monotonic()
    update = watch.wait_for(has_policy("made on a"), BOUND_S, done)
    assert [p.name for p in update.policies.policies] == ["made on a"]


def test_usage_on_a_pushes_window_spend_on_b(two: tuple[Replica, Replica, Watch]) -> None:
    a, _, watch = two
    policy = create_policy(a, "spend")
    watch.wait_for(has_policy("spend"), BOUND_S, time.monotonic())
    for total in (250_000_000, 500_000_000):
        assert not report(a, policy.id, 250_000_000).duplicate
        done = time.monotonic()
        update = watch.wait_for(
            lambda u, t=total: any(
                s.policy_id == policy.id and s.spent_nanos == t for s in u.spend
            ),
            BOUND_S,
            done,
        )
        (spend,) = [s for s in update.spend if s.policy_id == policy.id]
        assert spend.limit_nanos == 10_000_000_000
        assert spend.request_count == total // 250_000_000


def test_price_override_on_a_pushed_on_b(two: tuple[Replica, Replica, Watch]) -> None:
    a, _, watch = two
    a.pricing.SetPriceOverride(
        pp.SetPriceOverrideRequest(
            override=pp.PriceOverride(model="gpt-4o", price=pp.Price(input="1", output="2"))
        ),
        metadata=ADMIN,
        timeout=10,
    )
    done = time.monotonic()
    update = watch.wait_for(
        lambda u: (
            u.HasField("price_overrides")
            and [o.model for o in u.price_overrides.overrides] == ["gpt-4o"]
        ),
        BOUND_S,
        done,
    )
    assert update.price_overrides.overrides[0].price.output == "2"


def test_killed_listener_reconnects_and_keeps_delivering(
    two: tuple[Replica, Replica, Watch], pg_url: str
) -> None:
    a, b, watch = two
    sync = b.server.replicas
    assert sync is not None and sync.backend_pid is not None
    killed = sync.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (killed,)).fetchone() == (True,)
    # Made while B may not be listening: the resync after reconnecting carries it.
    create_policy(a, "while away")
    watch.wait_for(has_policy("while away"), RECONNECT_S, time.monotonic())
    deadline = time.monotonic() + RECONNECT_S
    while sync.backend_pid in (None, killed):
        assert time.monotonic() < deadline, "listener did not reconnect"
        time.sleep(0.01)
    assert sync.reconnects == 1
    # Connected again: back to the one-second bound.
    create_policy(a, "after reconnect")
    done = time.monotonic()
    watch.wait_for(has_policy("after reconnect"), BOUND_S, done)


def test_own_changes_are_not_published_twice(two: tuple[Replica, Replica, Watch]) -> None:
    _, b, watch = two
    create_policy(b, "made on b")
    watch.wait_for(has_policy("made on b"), BOUND_S, time.monotonic())
    with pytest.raises(queue.Empty):
        watch.updates.get(timeout=0.5)


def test_payloads_stay_under_the_notify_limit() -> None:
    keys = [(f"pol_{i:020d}", f"user-{i}" * 5, 1_700_000_000) for i in range(400)]
    payloads = encode("replica", "spend", keys)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    decoded = [json.loads(p) for p in payloads]
    assert all(d["r"] == "replica" and d["k"] == "spend" for d in decoded)
    assert [tuple(k) for d in decoded for k in d["w"]] == keys
    assert encode("replica", "spend", keys[:2]) == [
        json.dumps({"r": "replica", "k": "spend", "w": keys[:2]}, separators=(",", ":"))
    ]
    assert encode("replica", "spend", keys * 50) == ['{"r":"replica","k":"spend","w":[]}']
    assert encode("replica", "spend", [("p", "x" * 9000, 0)]) == [
        '{"r":"replica","k":"spend","w":[]}'
    ]
