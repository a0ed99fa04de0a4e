"""Replicas and incremental streams: a change made through replica A reaches
an incremental stream on replica B as that one change (policies and
overrides by id, deletions too), numbered; a lost listener connection or a
notification naming no ids (an earlier release's replica) resyncs B's
streams in place."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from control_plane.replicas import CHANNEL
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from tests.harness import FakeClock
from tests.replicas.test_replicas import (
    ADMIN,
    BOUND_S,
    DATA,
    RECONNECT_S,
    T0,
    Replica,
    create_policy,
    replica,
)

pytestmark = pytest.mark.postgres


class Stream:
    def __init__(self, r: Replica) -> None:
        self.call = r.dataplane.WatchState(
            dp.WatchStateRequest(data_plane_id="dp-on-b", incremental=True), metadata=DATA
        )
        self.updates: queue.Queue[dp.StateUpdate | grpc.RpcError] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seq = self.resync(10).seq

    def _read(self) -> None:
        try:
            for u in self.call:
                self.updates.put(u)
        except grpc.RpcError as e:
            self.updates.put(e)

    def next(self, timeout: float) -> dp.StateUpdate:
        item = self.updates.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def change(self) -> dp.StateUpdate:
        """The next change, within the one-second bound, numbered one more."""
        u = self.next(BOUND_S)
        assert not u.HasField("resync") and u.seq == self.seq + 1, u
        self.seq = u.seq
        return u

    def resync(self, timeout: float) -> dp.StateUpdate:
        """Reads a whole resync; its last page."""
        deadline = time.monotonic() + timeout
        pages: list[dp.StateUpdate] = []
        while True:
            u = self.next(max(deadline - time.monotonic(), 0.01))
            if not u.HasField("resync"):
                continue  # changes queued before the resync began
            assert u.resync.page == len(pages)
            pages.append(u)
            if u.resync.last:
                self.pages = pages
                return u


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[Replica, Replica, Stream]]:
    clock = FakeClock(T0)
    with replica(pg_url, clock) as a, replica(pg_url, clock) as b:
        stream = Stream(b)
        try:
            yield a, b, stream
        finally:
            stream.call.cancel()


def test_changes_through_a_reach_b_as_numbered_increments(
    two: tuple[Replica, Replica, Stream],
) -> None:
    a, _, stream = two
    p = create_policy(a, "made on a")
    u = stream.change()
    assert [(x.policy.id, x.version) for x in u.policy_changes.upserts] == [(p.id, 1)]
    a.budgets.UpdateBudgetPolicy(
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=p.id, name="renamed"), update_mask={"paths": ["name"]}
        ),
        metadata=ADMIN,
        timeout=10,
    )
    u = stream.change()
    assert [(x.policy.name, x.version) for x in u.policy_changes.upserts] == [("renamed", 2)]
    a.budgets.DeleteBudgetPolicy(pb.DeleteBudgetPolicyRequest(id=p.id), metadata=ADMIN, timeout=10)
    assert list(stream.change().policy_changes.deleted_ids) == [p.id]

    o = a.pricing.SetPriceOverride(
        pp.SetPriceOverrideRequest(
            override=pp.PriceOverride(model="gpt-4o", price=pp.Price(input="1", output="2"))
        ),
        metadata=ADMIN,
        timeout=10,
    )
    assert [x.id for x in stream.change().price_changes.upserts] == [o.id]
    a.pricing.DeletePriceOverride(
        pp.DeletePriceOverrideRequest(id=o.id), metadata=ADMIN, timeout=10
    )
    assert list(stream.change().price_changes.deleted_ids) == [o.id]


def test_a_lost_listener_or_an_idless_notification_resyncs_in_place(
    two: tuple[Replica, Replica, Stream], pg_url: str
) -> None:
    a, b, stream = two
    sync = b.server.replicas
    assert sync is not None and sync.backend_pid is not None
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (sync.backend_pid,))
    made = create_policy(a, "while away")
    last = stream.resync(RECONNECT_S)
    stream.seq = last.seq
    if made.id not in {x.policy.id for p in stream.pages for x in p.policy_changes.upserts}:
        # Listening again before the policy was made: it came as a change.
        assert made.id in {x.policy.id for x in stream.change().policy_changes.upserts}

    # A replica of the earlier release names no ids.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, '{"r":"old-replica","k":"policies"}'))
    last = stream.resync(RECONNECT_S)
    assert {x.policy.id for p in stream.pages for x in p.policy_changes.upserts} == {made.id}
    stream.seq = last.seq
    create_policy(a, "after")
    assert stream.change().policy_changes.upserts[0].policy.name == "after"
