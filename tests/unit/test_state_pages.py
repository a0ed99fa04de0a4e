"""control_plane/statepush.py and hub.py: state messages cut to size and
numbered, and a subscriber that falls behind is resynced, not cut off."""

from __future__ import annotations

import asyncio

import pytest

from control_plane import hub as hub_module
from control_plane.hub import RESYNC, StateHub
from control_plane.statepush import Pager, split
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp

LIMIT = 4096


def versioned(i: int, name_len: int = 150) -> dp.VersionedPolicy:
    return dp.VersionedPolicy(
        policy=pb.BudgetPolicy(id=f"bp_{i:026d}", name="n" * name_len, amount_usd="1"),
        version=i,
    )


def window(i: int, member_len: int = 70) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id="bp_wild",
        member=f"{i:08d}" + "m" * (member_len - 8),
        window_start=timestamp(1_700_000_000),
        window_end=timestamp(1_700_086_400),
        spent_nanos=i,
        limit_nanos=10**9,
    )


def test_pages_stay_under_the_limit_and_keep_every_item_in_order() -> None:
    pager = Pager(LIMIT)
    pages: list[dp.StateUpdate] = []
    for i in range(200):
        pager.policy(versioned(i))
        pages += pager.take()
    pager.override(pp.PriceOverride(id="po_1", model="gpt-4o"))
    pager.deleted_policy("bp_gone")
    for i in range(500):
        pager.spend(window(i))
        pages += pager.take()
    pages += pager.finish()

    assert len(pages) > 10
    assert all(0 < p.ByteSize() <= LIMIT for p in pages)
    assert [u.version for p in pages for u in p.policy_changes.upserts] == list(range(200))
    assert [w.spent_nanos for p in pages for w in p.spend] == list(range(500))
    assert [o.id for p in pages for o in p.price_changes.upserts] == ["po_1"]
    assert [i for p in pages for i in p.policy_changes.deleted_ids] == ["bp_gone"]


def test_an_item_larger_than_a_page_gets_a_page_of_its_own() -> None:
    pager = Pager(LIMIT)
    pager.policy(versioned(1))
    pager.policy(versioned(2, name_len=3 * LIMIT))
    pager.policy(versioned(3))
    pages = pager.finish()
    assert [[u.version for u in p.policy_changes.upserts] for p in pages] == [[1], [2], [3]]


def test_finish_always_gives_a_last_page_even_an_empty_one() -> None:
    assert Pager(LIMIT).finish() == [dp.StateUpdate()]


def test_split_leaves_a_small_update_alone_and_cuts_a_large_one() -> None:
    small = dp.StateUpdate(spend=[window(1)])
    assert split(small, LIMIT) == [small]
    large = dp.StateUpdate(
        spend=[window(i) for i in range(300)],
        policy_changes=dp.PolicyChanges(
            upserts=[versioned(i) for i in range(40)], deleted_ids=["bp_x"]
        ),
        price_changes=dp.PriceOverrideChanges(deleted_ids=["po_x"]),
    )
    pieces = split(large, LIMIT)
    assert len(pieces) > 5 and all(p.ByteSize() <= LIMIT for p in pieces)
    merged = dp.StateUpdate()
    for p in pieces:
        merged.MergeFrom(p)
    assert merged == large


def test_applied_batches_are_marked_on_the_last_piece_only() -> None:
    update = dp.StateUpdate(
        spend=[window(i) for i in range(300)],
        applied=dp.AppliedBatch(data_plane_id="dp-" + "d" * 60, batch_id="b" * 80),
    )
    update.applied_batches.extend(
        dp.AppliedBatch(data_plane_id="dp-" + "d" * 60, batch_id=f"{i:080d}") for i in range(20)
    )
    pieces = split(update, LIMIT)
    assert len(pieces) > 2 and all(p.ByteSize() <= LIMIT for p in pieces)
    assert [p.HasField("applied") for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert pieces[-1].applied == update.applied
    assert [len(p.applied_batches) for p in pieces] == [0] * (len(pieces) - 1) + [20]
    merged = dp.StateUpdate()
    for p in pieces:
        merged.MergeFrom(p)
    assert merged == update


async def test_the_hub_numbers_every_piece_and_resyncs_a_subscriber_that_falls_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = StateHub(page_bytes=LIMIT)
    async with hub.subscribe() as sub:
        hub.publish(dp.StateUpdate(spend=[window(1)]))  # before the resync began
        assert sub.begin_resync() == 1  # the resync includes change 1
        hub.publish(dp.StateUpdate(spend=[window(i) for i in range(300)]))
        got = [await sub.next() for _ in range(sub.queue.qsize())]
        assert [u.seq for u in got if isinstance(u, dp.StateUpdate)] == list(range(2, 2 + len(got)))
        assert len(got) > 5

        monkeypatch.setattr(hub_module, "QUEUE_LIMIT", 3)
        for i in range(5):
            hub.publish(dp.StateUpdate(spend=[window(i)]))
        assert sub.resync_owed and await sub.next() is RESYNC
        assert sub.queue.empty()  # nothing queued behind the marker: the resync covers it
        seq = sub.begin_resync()
        hub.publish(dp.StateUpdate(spend=[window(9)]))
        after = await asyncio.wait_for(sub.next(), 1)
        assert isinstance(after, dp.StateUpdate) and after.seq == seq + 1
