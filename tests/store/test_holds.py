"""Holds across data planes: the control plane as the arbiter near a budget's
line (DataPlaneService.Reserve and the holds carried by usage reports).

Runs on SQLite and PostgreSQL (``db_url``), with a FakeClock for expiry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument
from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store import repo
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock

USD = 1_000_000_000
T0 = datetime(2025, 3, 10, 12, 17, 30, tzinfo=UTC)
DAY_START = datetime(2025, 3, 10, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def cp(engine: Engine, clock: FakeClock) -> Iterator[ControlPlane]:
    c = ControlPlane(engine, StateHub(), clock=clock, hold_ttl_s=30)
    yield c
    c.close()


async def daily(cp: ControlPlane, amount: str = "1.00", action: int = pb.ACTION_REJECT) -> str:
    msg = pb.BudgetPolicy(
        name=f"daily {uuid.uuid4().hex[:8]}",  # unique per control plane
        amount_usd=amount,
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        action=action,
        scope=pb.SCOPE_GLOBAL,
    )
    return (await cp.create_policy(msg, "test")).id


def hold(policy_id: str, nanos: int) -> dp.WindowHold:
    return dp.WindowHold(policy_id=policy_id, window_start=timestamp(DAY_START), held_nanos=nanos)


def reserve(
    policy_id: str,
    dp_id: str,
    held: int,
    amount: int,
    seq: int,
    unapplied: tuple[dp.UnappliedBatch, ...] = (),
) -> dp.ReserveRequest:
    return dp.ReserveRequest(
        data_plane_id=dp_id,
        holds=[hold(policy_id, held)],
        holds_seq=seq,
        amount_nanos=amount,
        unapplied=unapplied,
    )


def usage(
    policy_id: str, batch_id: str, cost: int, dp_id: str, **kw: object
) -> dp.ReportUsageRequest:
    return dp.ReportUsageRequest(
        data_plane_id=dp_id,
        batch_id=batch_id,
        increments=[
            dp.SpendIncrement(
                policy_id=policy_id,
                window_start=timestamp(DAY_START),
                cost_nanos=cost,
                request_count=1,
            )
        ],
        **kw,  # type: ignore[arg-type]
    )


def holds_of(spend: Iterable[dp.WindowSpend]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ws in spend:
        for h in ws.holds:
            out[h.data_plane_id] = h.held_nanos
    return out


async def test_room_for_ten_admits_ten_across_two_data_planes(cp: ControlPlane) -> None:
    """Each request is estimated at $0.10 against $1.00: whatever the order the
    two data planes ask in, exactly ten are admitted (the tenth reaches the
    line), because each sees the other's holds under the window's lock."""
    pid = await daily(cp)
    held = {"a": 0, "b": 0}
    admitted = 0
    for i in range(30):
        side = "ab"[i % 2]
        held[side] += USD // 10
        resp = await cp.reserve(reserve(pid, side, held[side], USD // 10, i + 1))
        if resp.admitted:
            admitted += 1
        else:
            held[side] -= USD // 10
            assert resp.policy_id == pid
    assert admitted == 10
    assert held == {"a": USD // 2, "b": USD // 2}


async def test_concurrent_reserves_never_admit_past_the_line(cp: ControlPlane) -> None:
    """Forty requests from four data planes at once: at most ten get in."""
    pid = await daily(cp)
    seqs = iter(range(1, 1000))

    async def one(side: str, n: int) -> bool:
        # A data plane's report names all its holds so far (absolute).
        resp = await cp.reserve(reserve(pid, side, n * USD // 10, USD // 10, next(seqs)))
        return resp.admitted

    results = await asyncio.gather(*(one(side, n) for n in range(1, 11) for side in "abcd"))
    assert sum(results) <= 10
    assert sum(results) >= 4  # the first request of every data plane fits


async def test_a_burst_in_one_call_is_decided_in_order(cp: ControlPlane) -> None:
    """A data plane sends the requests that queued up meanwhile in one call:
    with room for 10 (another data plane holding 3 of it), the first 7 are
    admitted, and its recorded hold is theirs only."""
    pid = await daily(cp)
    assert (await cp.reserve(reserve(pid, "b", 3 * USD // 10, 3 * USD // 10, 1))).admitted
    item = dp.ReserveItem(windows=[hold(pid, 0)], amount_nanos=USD // 10)
    resp = await cp.reserve(
        dp.ReserveRequest(
            data_plane_id="a", holds=[hold(pid, 20 * USD // 10)], holds_seq=2, items=[item] * 20
        )
    )
    assert [v.admitted for v in resp.verdicts] == [True] * 7 + [False] * 13
    assert {v.policy_id for v in resp.verdicts if not v.admitted} == {pid}
    assert resp.admitted  # the first one's verdict
    assert holds_of(resp.spend) == {"a": 7 * USD // 10, "b": 3 * USD // 10}


async def test_spent_usage_and_holds_add_up(cp: ControlPlane) -> None:
    pid = await daily(cp)
    await cp.apply_usage(usage(pid, "b1", 7 * USD // 10, "a"))
    # $0.70 spent, b holds $0.20: a request of $0.05 from a still fits
    # ($0.90 before it), the next from a ($0.95 before it) too, then no more.
    assert (await cp.reserve(reserve(pid, "b", USD // 5, USD // 5, 1))).admitted
    assert (await cp.reserve(reserve(pid, "a", USD // 20, USD // 20, 2))).admitted
    assert (await cp.reserve(reserve(pid, "a", USD // 10, USD // 20, 3))).admitted
    denied = await cp.reserve(reserve(pid, "a", 3 * USD // 20, USD // 20, 4))
    assert not denied.admitted
    (ws,) = denied.spend
    assert ws.spent_nanos == 7 * USD // 10
    assert holds_of([ws]) == {"a": USD // 10, "b": USD // 5}


async def test_usage_report_replaces_holds_in_the_same_transaction(cp: ControlPlane) -> None:
    """The batch that brings a request's real cost also lowers the hold: the
    window never counts the request twice, nor loses it in between."""
    pid = await daily(cp)
    assert (await cp.reserve(reserve(pid, "a", USD // 2, USD // 2, 1))).admitted
    result = await cp.apply_usage(
        usage(pid, "b1", 3 * USD // 10, "a", holds=[hold(pid, 0)], holds_seq=2)
    )
    (ws,) = result.spend
    assert ws.spent_nanos == 3 * USD // 10 and holds_of([ws]) == {"a": 0}


async def test_an_older_report_never_overwrites_a_newer_one(cp: ControlPlane) -> None:
    pid = await daily(cp)
    assert (await cp.reserve(reserve(pid, "a", 4 * USD // 10, USD // 10, 10))).admitted
    stale = await cp.apply_usage(usage(pid, "b1", 0, "a", holds=[hold(pid, 0)], holds_seq=5))
    assert holds_of(stale.spend) == {"a": 4 * USD // 10}


async def test_holds_of_applied_batches_are_not_counted_twice(cp: ControlPlane) -> None:
    """A data plane counts a sent batch as held until its acknowledgement
    arrives; if the control plane already applied it, that part is left out."""
    pid = await daily(cp)
    await cp.apply_usage(usage(pid, "sent", 6 * USD // 10, "a", holds=[hold(pid, 0)], holds_seq=1))
    in_flight = dp.UnappliedBatch(batch_id="sent", usage=[hold(pid, 6 * USD // 10)])
    # a holds its running request ($0.30) + the unacknowledged batch ($0.60);
    # with the batch left out, $0.60 spent + $0.30 held = $0.90 < $1: admitted.
    resp = await cp.reserve(
        reserve(pid, "a", 9 * USD // 10 + USD // 10, USD // 10, 2, (in_flight,))
    )
    assert resp.admitted
    assert holds_of(resp.spend) == {"a": 4 * USD // 10}
    # A batch the control plane has not seen stays counted.
    unseen = dp.UnappliedBatch(batch_id="not-yet", usage=[hold(pid, 3 * USD // 10)])
    resp = await cp.reserve(reserve(pid, "b", 3 * USD // 10 + USD // 10, USD // 10, 3, (unseen,)))
    assert not resp.admitted  # $0.60 + a's $0.40 + b's $0.30 before it = $1.30


async def test_a_batch_applied_after_a_newer_report_is_taken_out_of_its_holds(
    cp: ControlPlane,
) -> None:
    """A data plane sends batch b1 (holds report seq 2) and, while it is in
    flight, a Reserve (seq 3) whose hold counts b1 as unapplied; the control
    plane handles the Reserve first. b1's own report is then older and
    cannot replace the hold: b1's usage is taken out of it instead, so it is
    counted once (spent), not twice (spent and held) until the next report."""
    pid = await daily(cp)
    assert (await cp.reserve(reserve(pid, "a", 2 * USD // 10, 2 * USD // 10, 1))).admitted
    in_flight = dp.UnappliedBatch(batch_id="b1", usage=[hold(pid, 3 * USD // 10)])
    # a: a new request ($0.10) + the one before ($0.20) + b1 ($0.30) unapplied.
    raced = await cp.reserve(reserve(pid, "a", 6 * USD // 10, USD // 10, 3, (in_flight,)))
    assert raced.admitted and holds_of(raced.spend) == {"a": 6 * USD // 10}
    applied = await cp.apply_usage(
        usage(pid, "b1", 3 * USD // 10, "a", holds=[hold(pid, USD // 10)], holds_seq=2)
    )
    (ws,) = applied.spend
    assert ws.spent_nanos == 3 * USD // 10
    assert holds_of([ws]) == {"a": 3 * USD // 10}  # the two running requests
    # So $0.30 spent + $0.30 held: a request of b's of $0.40 fits.
    assert (await cp.reserve(reserve(pid, "b", 4 * USD // 10, 4 * USD // 10, 4))).admitted
    # Applied again (a retry): nothing taken out twice.
    again = await cp.apply_usage(
        usage(pid, "b1", 3 * USD // 10, "a", holds=[hold(pid, USD // 10)], holds_seq=2)
    )
    assert again.duplicate and holds_of(again.spend) == {"a": 3 * USD // 10, "b": 4 * USD // 10}
    # A batch sent after the newest report (higher seq) replaces it as before.
    await cp.apply_usage(usage(pid, "b2", USD // 10, "a", holds=[hold(pid, 0)], holds_seq=5))
    snap = await cp.snapshot()
    assert holds_of(snap.spend)["a"] == 0


async def test_a_reserve_older_than_the_applied_batch_that_followed_it_counts_the_newer_report(
    cp: ControlPlane,
) -> None:
    """A data plane asks to admit a request (Reserve, seq 2) while its last
    request's $0.30 is still pending: the call's hold counts it. Then that
    usage goes out as batch b1 with a newer report (seq 3, the request's
    $0.10 estimate held), and the control plane applies b1 first. The
    Reserve decides on the newest report, as the stored rows do: $0.60 +
    $0.30 spent and $0.10 held < $1, admitted; its own hold would count the
    $0.30 twice ($1.30)."""
    pid = await daily(cp)
    await cp.apply_usage(usage(pid, "b0", 6 * USD // 10, "a", holds_seq=1))
    applied = await cp.apply_usage(
        usage(pid, "b1", 3 * USD // 10, "a", holds=[hold(pid, USD // 10)], holds_seq=3)
    )
    assert applied.spend[0].spent_nanos == 9 * USD // 10
    late = await cp.reserve(reserve(pid, "a", 4 * USD // 10, USD // 10, 2))
    assert late.admitted
    assert holds_of(late.spend) == {"a": USD // 10}  # the newer report stays
    # The next report replaces it as usual; the window is then full.
    assert not (await cp.reserve(reserve(pid, "a", 2 * USD // 10, USD // 10, 4))).admitted


async def test_answers_name_the_unapplied_batches_applied_already(cp: ControlPlane) -> None:
    """A report that names batches as unapplied is told which of them the
    control plane applied already, in its answer and in the state update of
    the same totals, so the data plane stops counting them as it takes the
    totals in."""
    pid = await daily(cp, amount="10.00")
    await cp.apply_usage(usage(pid, "done", USD, "a", holds_seq=1))
    named = (
        dp.UnappliedBatch(batch_id="done", usage=[hold(pid, USD)]),
        dp.UnappliedBatch(batch_id="still-out", usage=[hold(pid, USD)]),
    )
    async with cp.hub.subscribe() as sub:
        resp = await cp.reserve(reserve(pid, "a", 3 * USD, USD, 2, named))
        assert resp.admitted and list(resp.applied_batch_ids) == ["done"]
        report = await cp.apply_usage(
            usage(pid, "next", USD, "a", holds=[hold(pid, 2 * USD)], holds_seq=3, unapplied=named)
        )
        assert report.applied_batch_ids == ["done"]
        updates = [await sub.next() for _ in range(sub.queue.qsize())]
    marks = [[(a.data_plane_id, a.batch_id) for a in u.applied_batches] for u in updates]
    assert marks == [[("a", "done")], [("a", "done")]]
    # The held usage of "done" is not counted: $2 spent, a holds $1 + $1.
    assert holds_of(report.spend) == {"a": USD} and report.spend[0].spent_nanos == 2 * USD


async def test_a_batch_applied_while_a_reserve_waits_for_the_window_is_counted_once(
    cp: ControlPlane, engine: Engine, clock: FakeClock
) -> None:
    """Batch b1 is being applied (its id claimed, the window's row locked)
    when a Reserve that names it as unapplied arrives: the Reserve waits for
    the row, then reads the total with b1 in it, so it must also see b1 as
    applied (checked after the lock, not before). Else b1's $0.50 counts
    twice, spent and held: $0.50 + $0.50 + the request's $0.10 would refuse
    a request that fits."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one writing transaction at a time")
    pid = await daily(cp)
    b1 = dp.UnappliedBatch(batch_id="b1", usage=[hold(pid, 5 * USD // 10)])
    end = int((DAY_START + timedelta(days=1)).timestamp())
    with Session(engine) as s:
        assert repo.claim_batch(s, "b1", "a", clock())
        repo.add_spend(
            s,
            [repo.SpendDelta(pid, "", int(DAY_START.timestamp()), end, 5 * USD // 10, 1, 0)],
            clock(),
        )
        # a: b1 unapplied + a running request ($0.40) + this one ($0.10).
        waiting = asyncio.create_task(cp.reserve(reserve(pid, "a", USD, USD // 10, 2, (b1,))))
        for _ in range(500):  # the Reserve's transaction runs on the store's threads
            if waits_for_a_lock(engine):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the Reserve never waited for the window's row")
        s.commit()
    resp = await waiting
    assert resp.admitted and list(resp.applied_batch_ids) == ["b1"]
    assert holds_of(resp.spend) == {"a": 5 * USD // 10}
    assert resp.spend[0].spent_nanos == 5 * USD // 10


def waits_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as c:
        return bool(
            c.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )


async def test_holds_of_a_silent_data_plane_lapse(cp: ControlPlane, clock: FakeClock) -> None:
    pid = await daily(cp)
    assert (await cp.reserve(reserve(pid, "dead", USD, USD, 1))).admitted
    assert not (await cp.reserve(reserve(pid, "b", USD // 10, USD // 10, 2))).admitted
    clock.advance(timedelta(seconds=31))
    assert (await cp.reserve(reserve(pid, "b", USD // 10, USD // 10, 3))).admitted
    assert await cp.forget_expired_holds() == 1  # dead's row; b's is fresh
    snap = await cp.snapshot()
    assert holds_of(snap.spend) == {"b": USD // 10}


async def test_alert_policies_never_deny(cp: ControlPlane) -> None:
    pid = await daily(cp, action=pb.ACTION_ALERT)
    await cp.apply_usage(usage(pid, "b1", 2 * USD, "a"))
    assert (await cp.reserve(reserve(pid, "a", USD, USD, 1))).admitted


async def test_unknown_policies_are_ignored(cp: ControlPlane) -> None:
    resp = await cp.reserve(reserve("bp_gone", "a", USD, USD, 1))
    assert resp.admitted and not resp.spend


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (dp.ReserveRequest(holds=[hold("p", 1)], amount_nanos=1), "data_plane_id"),
        (dp.ReserveRequest(data_plane_id="a", amount_nanos=1), "holds"),
        (dp.ReserveRequest(data_plane_id="a", holds=[hold("p", -1)]), "holds[0].held_nanos"),
        (dp.ReserveRequest(data_plane_id="a", holds=[hold("", 1)]), "holds[0].policy_id"),
        (
            dp.ReserveRequest(data_plane_id="a", holds=[hold("p", 1)], amount_nanos=-1),
            "amount_nanos",
        ),
        (
            dp.ReserveRequest(
                data_plane_id="a", holds=[hold("p", 1)], unapplied=[dp.UnappliedBatch()]
            ),
            "unapplied[0].batch_id",
        ),
        (
            dp.ReserveRequest(
                data_plane_id="a",
                holds=[hold("p", 1)],
                items=[dp.ReserveItem(windows=[hold("p", 0)], amount_nanos=-5)],
            ),
            "items[0].amount_nanos",
        ),
    ],
)
async def test_bad_reserve_requests_name_the_field(
    cp: ControlPlane, req: dp.ReserveRequest, field: str
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await cp.reserve(req)
    assert [v.field for v in exc.value.violations] == [field]


async def test_usage_with_increments_needs_a_batch_id(cp: ControlPlane) -> None:
    pid = await daily(cp)
    with pytest.raises(InvalidArgument):
        await cp.apply_usage(usage(pid, "", 1, "a"))
    # Holds alone need none, and count nothing.
    result = await cp.apply_usage(
        dp.ReportUsageRequest(data_plane_id="a", holds=[hold(pid, 5)], holds_seq=1)
    )
    (ws,) = result.spend
    assert ws.spent_nanos == 0 and ws.request_count == 0 and holds_of([ws]) == {"a": 5}
