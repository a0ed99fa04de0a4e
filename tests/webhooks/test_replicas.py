"""Two control plane servers on one PostgreSQL database, each with its own
dispatcher: usage reported to both at once crosses a policy, and each event
reaches the receiver exactly once (events by the unique key, sends by
FOR UPDATE SKIP LOCKED claims)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from tests.harness import ADMIN_TOKEN, FakeClock, bearer, wait_until
from tests.webhooks.conftest import USD, Api, running_api
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.postgres


@pytest.fixture
def two(pg_url: str, clock: FakeClock) -> Iterator[tuple[Api, Api]]:
    with running_api(pg_url, clock) as a, running_api(pg_url, clock) as b:
        yield a, b


def report_concurrently(
    apis: tuple[Api, Api], policy_id: str, per: int, nanos: int, members: list[str]
) -> None:
    barrier = threading.Barrier(2 * len(members))
    errors: list[BaseException] = []

    def worker(api: Api, member: str) -> None:
        try:
            barrier.wait(10)
            for _ in range(per):
                assert not api.report(policy_id, nanos, member).duplicate
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(api, m)) for api in apis for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


def test_two_replicas_one_exceeded_event_delivered_once(
    two: tuple[Api, Api], receiver: Receiver
) -> None:
    a, b = two
    a.webhooks.CreateWebhook(
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url)
        ),
        metadata=bearer(ADMIN_TOKEN),
        timeout=10,
    )
    policy = a.policy("1", alert_thresholds=[50])
    # 2 replicas x 4 threads x 25 reports of $0.01 = $2: both levels crossed mid-way.
    report_concurrently(two, policy.id, 25, USD // 100, [""] * 4)
    wait_until(lambda: len(receiver.received()) >= 2, message="two events")
    # Give any duplicate a chance to show up before counting.
    for api in two:
        api.loop.run(api.server.dispatcher.run_until_idle())
    kinds = Counter(r.json()["action"] for r in receiver.received())
    assert kinds == {"threshold_crossed": 1, "exceeded": 1}
    deliveries = b.deliveries()
    assert sorted(d.event.type for d in deliveries) == [
        "budget_policy.exceeded",
        "budget_policy.threshold_crossed",
    ]
    assert {(d.state, d.attempt_count) for d in deliveries} == {(wpb.DELIVERY_STATE_DELIVERED, 1)}


def test_two_dispatchers_share_deliveries_without_sending_twice(
    two: tuple[Api, Api], receiver: Receiver
) -> None:
    a, b = two
    for i in range(3):
        b.webhooks.CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(
                    name=f"h{i}", format=wpb.WEBHOOK_FORMAT_GENERIC, url=f"{receiver.url}/{i}"
                )
            ),
            metadata=bearer(ADMIN_TOKEN),
            timeout=10,
        )
    policy = a.policy("0.05", scope=pb.SCOPE_USER, target="*")
    members = [f"user-{i}" for i in range(10)]
    report_concurrently(two, policy.id, 3, USD // 50, members)  # each member: $0.06
    wait_until(lambda: len(receiver.received()) >= 30, timeout=30, message="30 deliveries")
    for api in two:
        api.loop.run(api.server.dispatcher.run_until_idle())
    sent = Counter((r.path, r.json()["data"]["member"]) for r in receiver.received())
    assert len(sent) == 30 and set(sent.values()) == {1}
    assert {r.headers["webhook-id"] for r in receiver.received()} == {d.id for d in a.deliveries()}
