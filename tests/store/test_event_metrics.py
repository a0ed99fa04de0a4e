"""Budget event counters agree with the database (issue 13, item 3), on
SQLite and PostgreSQL.

Before, a large usage report ran past its caller's deadline: the
transaction committed 2,000 threshold events, but the cancelled coroutine
never counted them (``budget_events_total{threshold_crossed}`` stayed 0).
Now what a committed transaction recorded is counted when it commits,
whether or not anyone still waits for the answer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from control_plane.service import ControlPlane
from control_plane.store.models import WebhookEventRow
from control_plane.webhooks.events import EXCEEDED, THRESHOLD_CROSSED
from spendgate.v1 import budget_pb2 as pb
from tests.store.builders import USD, batch, inc, policy

MEMBERS = 100
THRESHOLDS = tuple(range(5, 101, 5))  # the most a policy may have: 20


def stored_events(engine: Engine) -> Counter[str]:
    with Session(engine) as s:
        return Counter(s.scalars(select(WebhookEventRow.kind)))


async def test_events_committed_after_the_caller_gave_up_are_counted(
    cp: ControlPlane, engine: Engine
) -> None:
    p = await cp.create_policy(
        policy(scope=pb.SCOPE_USER, target="*", amount="1", thresholds=THRESHOLDS), "a"
    )
    # Every member crosses every threshold and the limit in one report.
    report = batch("big", *(inc(p.id, 2 * USD, member=f"user-{i}") for i in range(MEMBERS)))
    # Hold the store's thread so the report is queued, then give up on it
    # (as a gRPC deadline does) before its transaction has even started.
    busy, release = threading.Event(), threading.Event()
    blocker = cp._pool.submit(lambda: (busy.set(), release.wait(30)))
    assert await asyncio.to_thread(busy.wait, 30)
    task = asyncio.create_task(cp.apply_usage(report))
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    release.set()
    await asyncio.wrap_future(blocker)

    expected = {THRESHOLD_CROSSED: MEMBERS * len(THRESHOLDS), EXCEEDED: MEMBERS}

    def counted() -> bool:
        return {k: cp.metrics.events[k] for k in expected} == expected

    deadline = time.monotonic() + 60
    while not counted():
        assert time.monotonic() < deadline, "the committed events were never counted"
        await asyncio.sleep(0.02)
    assert stored_events(engine) == Counter(expected)
    assert task.cancelled()
    # The batch was applied once: a retry of it is a duplicate and counts nothing.
    again = await cp.apply_usage(report)
    assert again.duplicate
    assert {k: cp.metrics.events[k] for k in expected} == expected
    assert cp.metrics.batches == {"applied": 1, "duplicate": 1}
