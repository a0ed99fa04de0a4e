"""Admission (decide) and the data plane's local view of spend (LocalState)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ext_proc.admission.decide import Rejection, SpendKey, decide
from ext_proc.sync.state import Batch, Increment, LocalState
from spendgate.domain.policies import Action, Match, Policy, Scope
from spendgate.domain.windows import Window, WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

USD = 10**9
NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)  # a Monday
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAY_END = int(datetime(2025, 3, 11, tzinfo=UTC).timestamp())
HOUR_START = int(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())
HOUR_END = int(datetime(2025, 3, 10, 13, tzinfo=UTC).timestamp())
MONTH_START = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
DAY = WindowSpec(WindowUnit.DAYS)
HOUR = WindowSpec(WindowUnit.HOURS)
MONTH = WindowSpec(WindowUnit.MONTHS)


def policy(
    pid: str,
    amount_usd: int = 10,
    window: WindowSpec = DAY,
    action: Action = Action.REJECT,
    scope: Scope = Scope.GLOBAL,
    target: str = "",
) -> Policy:
    return Policy(pid, f"name of {pid}", amount_usd * USD, window, action, scope, target)


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def spend_of(table: dict[SpendKey, int]) -> Callable[[SpendKey], int]:
    return lambda key: table.get(key, 0)


# ---- decide ----

DAILY = policy("daily", 10, DAY)
HOURLY = policy("hourly", 1, HOUR)
MONTHLY = policy("monthly", 100, MONTH)
ALERT = policy("alert", 1, MONTH, Action.ALERT)
EACH_USER = policy("each-user", 5, DAY, scope=Scope.USER, target="*")


@pytest.mark.parametrize(
    ("matches", "spent", "expected"),
    [
        pytest.param([], {}, None, id="nothing-matches"),
        pytest.param([(DAILY, "")], {}, None, id="nothing-spent"),
        pytest.param(
            [(DAILY, "")], {("daily", "", DAY_START): 10 * USD - 1}, None, id="one-nano-below"
        ),
        pytest.param(
            [(DAILY, "")],
            {("daily", "", DAY_START): 10 * USD},
            ("daily", "", DAY_START, DAY_END, 10 * USD),
            id="exactly-at-limit",
        ),
        pytest.param(
            [(DAILY, "")],
            {("daily", "", DAY_START): 12 * USD},
            ("daily", "", DAY_START, DAY_END, 12 * USD),
            id="over-limit",
        ),
        pytest.param(
            [(DAILY, "")],
            {("daily", "", DAY_START - 86400): 50 * USD},
            None,
            id="previous-window-does-not-count",
        ),
        pytest.param(
            [(ALERT, "")], {("alert", "", MONTH_START): 99 * USD}, None, id="alert-never-rejects"
        ),
        pytest.param(
            [(HOURLY, ""), (DAILY, ""), (MONTHLY, "")],
            {
                ("hourly", "", HOUR_START): 1 * USD,
                ("daily", "", DAY_START): 10 * USD,
                ("monthly", "", MONTH_START): 1 * USD,
            },
            ("daily", "", DAY_START, DAY_END, 10 * USD),
            id="latest-reset-wins-daily-over-hourly",
        ),
        pytest.param(
            [(DAILY, ""), (HOURLY, "")],
            {("hourly", "", HOUR_START): 3 * USD},
            ("hourly", "", HOUR_START, HOUR_END, 3 * USD),
            id="only-hourly-exceeded",
        ),
        pytest.param(
            [(ALERT, ""), (HOURLY, "")],
            {("alert", "", MONTH_START): 99 * USD, ("hourly", "", HOUR_START): 1 * USD},
            ("hourly", "", HOUR_START, HOUR_END, 1 * USD),
            id="alert-ignored-reject-reported",
        ),
        pytest.param(
            [(EACH_USER, "alice")],
            {("each-user", "alice", DAY_START): 5 * USD},
            ("each-user", "alice", DAY_START, DAY_END, 5 * USD),
            id="wildcard-member-exceeded",
        ),
        pytest.param(
            [(EACH_USER, "bob")],
            {("each-user", "alice", DAY_START): 5 * USD},
            None,
            id="wildcard-other-member-admitted",
        ),
    ],
)
def test_decide(
    matches: list[Match],
    spent: dict[SpendKey, int],
    expected: tuple[str, str, int, int, int] | None,
) -> None:
    r = decide(matches, spend_of(spent), NOW)
    if expected is None:
        assert r is None
        return
    pid, member, start, end, amount = expected
    assert r is not None
    assert r == Rejection(r.policy, member, Window(utc(start), utc(end)), amount)
    assert r.policy.id == pid


@pytest.mark.parametrize(
    ("spent", "held", "expected"),
    [
        pytest.param(
            {("daily", "", DAY_START): 10 * USD},
            {("daily", "", DAY_START): (3 * USD, 2)},
            ("daily", 3 * USD, 2, True),
            id="daily-full-of-holds-only",
        ),
        pytest.param(
            {("daily", "", DAY_START): 13 * USD},
            {("daily", "", DAY_START): (3 * USD, 2)},
            ("daily", 3 * USD, 2, False),
            id="spend-alone-at-the-limit",
        ),
        pytest.param(
            {("daily", "", DAY_START): 10 * USD},
            {("daily", "", DAY_START): (30 * USD, 1)},
            ("daily", 10 * USD, 1, True),
            id="held-more-than-counted-is-capped",
        ),
        pytest.param(
            {("daily", "", DAY_START): 10 * USD, ("hourly", "", HOUR_START): 1 * USD},
            {("daily", "", DAY_START): (1, 1)},
            ("hourly", 0, 0, False),
            id="a-spent-hourly-outranks-a-held-daily",
        ),
        pytest.param(
            {("daily", "", DAY_START): 10 * USD, ("hourly", "", HOUR_START): 1 * USD},
            {("daily", "", DAY_START): (1, 1), ("hourly", "", HOUR_START): (1, 1)},
            ("daily", 1, 1, True),
            id="both-held-latest-reset",
        ),
        pytest.param(
            {("daily", "", DAY_START): 10 * USD, ("hourly", "", HOUR_START): 1 * USD},
            {("hourly", "", HOUR_START): (1, 1)},
            ("daily", 0, 0, False),
            id="spent-daily-over-held-hourly",
        ),
    ],
)
def test_decide_tells_spent_from_held(
    spent: dict[SpendKey, int],
    held: dict[SpendKey, tuple[int, int]],
    expected: tuple[str, int, int, bool],
) -> None:
    """A request is refused as held only (retry in seconds) when every
    exceeded window's spend alone is under its limit."""
    r = decide([(DAILY, ""), (HOURLY, "")], spend_of(spent), NOW, lambda k: held.get(k, (0, 0)))
    assert r is not None
    assert (r.policy.id, r.held_nanos, r.held_requests, r.held_only) == expected


def test_decide_ties_keep_the_first_policy() -> None:
    other = policy("daily-2", 10, DAY)
    spent = {("daily", "", DAY_START): 10 * USD, ("daily-2", "", DAY_START): 10 * USD}
    r = decide([(DAILY, ""), (other, "")], spend_of(spent), NOW)
    assert r is not None and r.policy.id == "daily"


def test_new_window_admits_again() -> None:
    state = LocalState()
    matches = [(DAILY, "")]
    state.charge(matches, 10 * USD, NOW, estimated=False)
    assert decide(matches, state.spent, NOW) is not None
    assert decide(matches, state.spent, NOW.replace(hour=23, minute=59, second=59)) is not None
    assert decide(matches, state.spent, NOW.replace(hour=0) + timedelta(days=1)) is None


def test_raising_the_amount_admits_at_once() -> None:
    state = LocalState()
    state.charge([(DAILY, "")], 10 * USD, NOW, estimated=False)
    assert decide([(DAILY, "")], state.spent, NOW) is not None
    raised = dataclasses.replace(DAILY, amount_nanos=10 * USD + 1)
    assert decide([(raised, "")], state.spent, NOW) is None


def test_decide_uses_the_policy_timezone() -> None:
    tokyo = policy("tokyo", 1, WindowSpec(WindowUnit.DAYS, timezone="Asia/Tokyo"))
    # 12:30 UTC is 21:30 in Tokyo: the local day started at 15:00 UTC the day before.
    start = int(datetime(2025, 3, 9, 15, tzinfo=UTC).timestamp())
    r = decide([(tokyo, "")], spend_of({("tokyo", "", start): USD}), NOW)
    assert r is not None
    assert r.window == Window(utc(start), utc(start + 86400))


# ---- LocalState: local usage ----


def test_charge_adds_to_every_matched_window() -> None:
    state = LocalState()
    matches = [(DAILY, ""), (HOURLY, ""), (EACH_USER, "alice"), (ALERT, "")]
    state.charge(matches, 300, NOW, estimated=False)
    state.charge(matches, 200, NOW + timedelta(minutes=10), estimated=True)
    assert state.pending == {
        ("daily", "", DAY_START): Increment(500, 2, 1),
        ("hourly", "", HOUR_START): Increment(500, 2, 1),
        ("each-user", "alice", DAY_START): Increment(500, 2, 1),
        ("alert", "", MONTH_START): Increment(500, 2, 1),
    }
    # The next hour is a new hourly window, but the same day.
    state.charge(matches[:2], 7, NOW + timedelta(hours=1), estimated=False)
    assert state.pending[("daily", "", DAY_START)] == Increment(507, 3, 1)
    assert state.pending[("hourly", "", HOUR_END)] == Increment(7, 1, 0)
    assert state.pending[("hourly", "", HOUR_START)] == Increment(500, 2, 1)


def test_charge_zero_cost_still_counts_the_request() -> None:
    state = LocalState()
    state.charge([(DAILY, "")], 0, NOW, estimated=False)
    assert state.pending == {("daily", "", DAY_START): Increment(0, 1, 0)}


def window_spend(key: SpendKey, spent: int, end: int = DAY_END) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=key[0],
        member=key[1],
        window_start=timestamp(key[2]),
        window_end=timestamp(end),
        spent_nanos=spent,
    )


KEY = ("daily", "", DAY_START)


def test_spent_is_remote_plus_pending_plus_in_flight() -> None:
    state = LocalState()
    assert state.spent(KEY) == 0
    state.merge_spend([window_spend(KEY, 1000)])
    state.charge([(DAILY, "")], 20, NOW, estimated=False)
    first = state.take_batch()
    assert first is not None
    first.sent = True  # the next take starts a new batch
    state.charge([(DAILY, "")], 300, NOW, estimated=False)
    assert state.take_batch() is not None
    state.charge([(DAILY, "")], 4000, NOW, estimated=False)
    assert len(state.in_flight) == 2
    assert state.spent(KEY) == 1000 + 20 + 300 + 4000
    assert state.spent(("daily", "other", DAY_START)) == 0
    assert state.unsent_count() == 3


def test_take_batch_moves_pending_to_a_fresh_in_flight_batch() -> None:
    state = LocalState()
    assert state.take_batch() is None
    state.charge([(DAILY, ""), (HOURLY, "")], 5, NOW, estimated=False)
    first = state.take_batch()
    assert first is not None
    assert state.pending == {}
    assert state.take_batch() is None  # nothing new pending: no empty batch
    assert first.increments == {
        ("daily", "", DAY_START): Increment(5, 1, 0),
        ("hourly", "", HOUR_START): Increment(5, 1, 0),
    }
    first.sent = True  # a sent batch is never extended
    state.charge([(DAILY, "")], 6, NOW, estimated=True)
    second = state.take_batch()
    assert second is not None
    assert second.batch_id != first.batch_id
    assert len(first.batch_id) == 32
    assert state.in_flight == {first.batch_id: first, second.batch_id: second}
    # Charging after take_batch never mutates a batch already in flight.
    state.charge([(DAILY, "")], 1000, NOW, estimated=False)
    assert first.increments[("daily", "", DAY_START)] == Increment(5, 1, 0)
    assert second.increments == {("daily", "", DAY_START): Increment(6, 1, 1)}


def test_take_batch_extends_the_newest_batch_while_it_was_never_sent() -> None:
    state = LocalState()
    state.charge([(DAILY, "")], 5, NOW, estimated=False)
    first = state.take_batch()
    assert first is not None
    state.charge([(DAILY, ""), (HOURLY, "")], 6, NOW, estimated=True)
    assert state.take_batch() is first
    assert first.increments == {
        ("daily", "", DAY_START): Increment(11, 2, 1),
        ("hourly", "", HOUR_START): Increment(6, 1, 1),
    }
    assert list(state.in_flight) == [first.batch_id]


def test_batch_message() -> None:
    batch = Batch("b1", {KEY: Increment(5, 2, 1)})
    assert batch.message("dp-1") == dp.ReportUsageRequest(
        data_plane_id="dp-1",
        batch_id="b1",
        increments=[
            dp.SpendIncrement(
                policy_id="daily",
                member="",
                window_start=timestamp(DAY_START),
                cost_nanos=5,
                request_count=2,
                estimated_count=1,
            )
        ],
    )


def test_acknowledge_merges_totals_and_drops_the_batch() -> None:
    state = LocalState()
    state.merge_spend([window_spend(KEY, 1000)])
    state.charge([(DAILY, "")], 50, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    assert state.spent(KEY) == 1050
    # The control plane applied the batch: its total includes our 50.
    state.acknowledge(batch, dp.ReportUsageResponse(spend=[window_spend(KEY, 1050)]))
    assert state.in_flight == {}
    assert state.remote == {KEY: (1050, DAY_END)}
    assert state.spent(KEY) == 1050  # not 1100: no double count after the ack


def test_acknowledge_twice_is_harmless() -> None:
    state = LocalState()
    state.charge([(DAILY, "")], 50, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    resp = dp.ReportUsageResponse(spend=[window_spend(KEY, 50)])
    state.acknowledge(batch, resp)
    state.acknowledge(batch, resp)
    assert state.spent(KEY) == 50


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param(1000, 400, 1000, id="stale-smaller-ignored"),
        pytest.param(1000, 1000, 1000, id="equal"),
        pytest.param(1000, 1500, 1500, id="larger-wins"),
    ],
)
def test_merge_spend_keeps_the_max(first: int, second: int, expected: int) -> None:
    state = LocalState()
    state.merge_spend([window_spend(KEY, first)])
    state.merge_spend([window_spend(KEY, second)])
    assert state.remote == {KEY: (expected, DAY_END)}


def test_stale_ack_never_lowers_spend() -> None:
    state = LocalState()
    state.merge_spend([window_spend(KEY, 1000)])  # from the state stream
    state.charge([(DAILY, "")], 50, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    # An ack carrying a total older than what the stream already told us.
    state.acknowledge(batch, dp.ReportUsageResponse(spend=[window_spend(KEY, 600)]))
    assert state.spent(KEY) == 1000


# ---- LocalState: control plane state ----


def policy_msg(pid: str, amount: str = "10", **kw: Any) -> pb.BudgetPolicy:
    fields: dict[str, Any] = {
        "id": pid,
        "name": f"name of {pid}",
        "amount_usd": amount,
        "window": pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        "action": pb.ACTION_REJECT,
        "scope": pb.SCOPE_GLOBAL,
        "enabled": True,
    }
    fields.update(kw)
    return pb.BudgetPolicy(**fields)


def snapshot(
    *policies: pb.BudgetPolicy, spend: list[dp.WindowSpend] | None = None
) -> dp.StateUpdate:
    return dp.StateUpdate(
        policies=dp.PolicySnapshot(policies=policies), spend=spend or [], full_snapshot=True
    )


def test_apply_full_snapshot_replaces_remote_spend_and_policies() -> None:
    state = LocalState()
    state.apply_update(
        snapshot(policy_msg("old"), spend=[window_spend(("old", "", DAY_START), 7)]), NOW
    )
    assert state.synced is True
    assert list(state.index.policies) == ["old"]
    state.charge([(DAILY, "")], 5, NOW, estimated=False)

    state.apply_update(snapshot(policy_msg("daily", "2.5"), spend=[window_spend(KEY, 900)]), NOW)
    assert list(state.index.policies) == ["daily"]
    assert state.index.policies["daily"] == Policy(
        "daily", "name of daily", 2_500_000_000, DAY, Action.REJECT, Scope.GLOBAL, ""
    )
    assert state.remote == {KEY: (900, DAY_END)}  # "old" totals are gone
    assert state.spent(KEY) == 905  # local pending usage is kept


def test_full_snapshot_may_lower_a_total() -> None:
    # A full snapshot is authoritative (e.g. the admin reset a window).
    state = LocalState()
    state.apply_update(snapshot(spend=[window_spend(KEY, 900)]), NOW)
    state.apply_update(snapshot(spend=[window_spend(KEY, 100)]), NOW)
    assert state.remote == {KEY: (100, DAY_END)}


def test_incremental_update_merges_and_keeps_policies() -> None:
    state = LocalState()
    state.apply_update(snapshot(policy_msg("daily"), spend=[window_spend(KEY, 900)]), NOW)
    other = ("daily", "x", DAY_START)
    state.apply_update(dp.StateUpdate(spend=[window_spend(KEY, 800), window_spend(other, 1)]), NOW)
    assert list(state.index.policies) == ["daily"]
    assert state.remote == {KEY: (900, DAY_END), other: (1, DAY_END)}


def test_policies_without_full_snapshot_replace_the_policy_set() -> None:
    state = LocalState()
    state.apply_update(snapshot(policy_msg("a"), policy_msg("b")), NOW)
    state.apply_update(dp.StateUpdate(policies=dp.PolicySnapshot(policies=[policy_msg("b")])), NOW)
    assert list(state.index.policies) == ["b"]
    state.apply_update(dp.StateUpdate(policies=dp.PolicySnapshot()), NOW)
    assert len(state.index) == 0


def test_prune_drops_ended_windows() -> None:
    state = LocalState()
    hourly = ("hourly", "", HOUR_START)
    state.merge_spend([window_spend(KEY, 10), window_spend(hourly, 20, HOUR_END)])
    state.prune(utc(HOUR_END) - timedelta(microseconds=1))
    assert set(state.remote) == {KEY, hourly}
    state.prune(utc(HOUR_END))  # the end is exclusive
    assert state.remote == {KEY: (10, DAY_END)}


def test_apply_update_prunes() -> None:
    state = LocalState()
    state.apply_update(dp.StateUpdate(spend=[window_spend(KEY, 10)]), utc(DAY_END))
    assert state.remote == {}


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(policy_msg("bad", "ten"), id="amount-not-a-number"),
        pytest.param(policy_msg("bad", "1.0000000001"), id="amount-too-fine"),
        pytest.param(policy_msg("bad", scope=pb.SCOPE_UNSPECIFIED), id="scope-unspecified"),
        pytest.param(policy_msg("bad", action=pb.ACTION_UNSPECIFIED), id="action-unspecified"),
        pytest.param(policy_msg("bad", window=pb.BudgetWindow()), id="window-missing"),
        pytest.param(
            policy_msg("bad", window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=0)),
            id="window-count-0",
        ),
        pytest.param(policy_msg("bad", timezone="Mars/Olympus"), id="unknown-timezone"),
    ],
)
def test_unconvertible_policy_is_skipped(bad: pb.BudgetPolicy) -> None:
    state = LocalState()
    state.apply_update(snapshot(policy_msg("good"), bad, policy_msg("also-good")), NOW)
    assert list(state.index.policies) == ["good", "also-good"]
    assert state.synced is True


def test_disabled_policy_in_snapshot_is_not_enforced() -> None:
    state = LocalState()
    state.apply_update(snapshot(policy_msg("on"), policy_msg("off", enabled=False)), NOW)
    assert list(state.index.policies) == ["on"]


def test_a_stream_total_marked_with_our_batch_ends_its_double_count() -> None:
    """The state stream can bring the total that includes our batch before
    the ReportUsage answer does: the batch stops counting as unsent then."""
    state = LocalState(identity="dp-1")
    state.merge_spend([window_spend(KEY, 1000)])
    state.charge([(DAILY, "")], 50, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    batch.sent = True
    update = dp.StateUpdate(spend=[window_spend(KEY, 1050)])
    update.applied.data_plane_id = "dp-1"
    update.applied.batch_id = batch.batch_id
    state.apply_update(update, NOW)
    assert state.in_flight == {}
    assert state.spent(KEY) == 1050  # not 1100
    # The answer arriving afterwards changes nothing.
    state.acknowledge(batch, dp.ReportUsageResponse(spend=[window_spend(KEY, 1050)]))
    assert state.spent(KEY) == 1050


def test_another_data_planes_applied_batch_is_not_ours() -> None:
    state = LocalState(identity="dp-1")
    state.charge([(DAILY, "")], 50, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    for who in ("dp-2", ""):
        update = dp.StateUpdate(spend=[window_spend(KEY, 70)])
        update.applied.data_plane_id = who
        update.applied.batch_id = batch.batch_id
        state.apply_update(update, NOW)
        assert list(state.in_flight) == [batch.batch_id]
        assert state.spent(KEY) == 70 + 50  # their 70; ours is still unsent
