"""ext_proc/sync/statestream.py and view.py: a resync takes effect only with its
last page, changes are checked for gaps, versions and deletions win over
message order, and snapshots of either format are read back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ext_proc.sync import snapshot
from ext_proc.sync.state import LocalState
from ext_proc.sync.statestream import Received, StateStream, StreamBroken
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp

DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
NOW = datetime(2025, 3, 10, 12, tzinfo=UTC)


def pol(pid: str, version: int = 1, amount: str = "1") -> dp.VersionedPolicy:
    return dp.VersionedPolicy(
        policy=pb.BudgetPolicy(
            id=pid,
            name=pid,
            amount_usd=amount,
            window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
            action=pb.ACTION_REJECT,
            scope=pb.SCOPE_GLOBAL,
            enabled=True,
        ),
        version=version,
    )


def spend(pid: str, nanos: int, member: str = "") -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=pid,
        member=member,
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_START + 86400),
        spent_nanos=nanos,
    )


def page(n: int, *policies: dp.VersionedPolicy, last: bool = False, seq: int = 0,
         windows: tuple[dp.WindowSpend, ...] = ()) -> dp.StateUpdate:  # fmt: skip
    return dp.StateUpdate(
        resync=dp.ResyncPage(page=n, last=last),
        seq=seq,
        policy_changes=dp.PolicyChanges(upserts=policies),
        spend=windows,
    )


def change(seq: int, **kw: object) -> dp.StateUpdate:
    return dp.StateUpdate(seq=seq, **kw)  # type: ignore[arg-type]


def stream() -> tuple[LocalState, StateStream]:
    state = LocalState()
    return state, StateStream(state, lambda: NOW)


def test_a_resync_takes_effect_with_its_last_page_only() -> None:
    state, s = stream()
    s.receive(page(0, pol("a"), last=True, seq=4))
    assert list(state.index.policies) == ["a"]

    assert s.receive(page(0, pol("b"), windows=(spend("b", 5),))) is Received.PAGE
    assert s.receive(page(1, pol("c"))) is Received.PAGE
    assert list(state.index.policies) == ["a"]  # still the old view
    assert s.receive(page(2, last=True, seq=9, windows=(spend("c", 7),))) is Received.SYNCED
    assert list(state.index.policies) == ["b", "c"] and state.synced
    assert state.spent(("b", "", DAY_START)) == 5 and state.spent(("c", "", DAY_START)) == 7
    # The next change must be number 10.
    assert s.receive(change(10, spend=[spend("c", 8)])) is Received.CHANGE
    assert state.spent(("c", "", DAY_START)) == 8


def test_a_resync_cut_short_leaves_the_previous_view_and_a_new_one_restarts() -> None:
    state, s = stream()
    s.receive(page(0, pol("a"), last=True, seq=1))
    s.receive(page(0, pol("x")))  # this resync never finishes ...
    s.receive(page(0, pol("y")))  # ... a new one starts over
    s.receive(page(1, last=True, seq=3))
    assert list(state.index.policies) == ["y"]


@pytest.mark.parametrize(
    ("updates", "reason"),
    [
        pytest.param([change(1)], "protocol", id="change-before-first-resync"),
        pytest.param([page(1, last=True)], "protocol", id="resync-without-page-0"),
        pytest.param([page(0), page(2, last=True)], "protocol", id="page-skipped"),
        pytest.param([page(0, last=True, seq=5), change(7)], "gap", id="change-missed"),
        pytest.param([page(0, last=True, seq=5), change(6), change(6)], "gap", id="change-twice"),
    ],
)
def test_what_cannot_be_followed_breaks_the_stream(
    updates: list[dp.StateUpdate], reason: str
) -> None:
    _, s = stream()
    with pytest.raises(StreamBroken) as e:
        for u in updates:
            s.receive(u)
    assert e.value.reason == reason


class _Broken(LocalState):
    def apply_update(self, update: dp.StateUpdate, now: datetime) -> None:
        raise RuntimeError("disk on fire")


def test_an_update_that_cannot_be_applied_breaks_the_stream() -> None:
    state = _Broken()
    s = StateStream(state, lambda: NOW)
    s.receive(page(0, last=True, seq=1))
    with pytest.raises(StreamBroken) as e:
        s.receive(change(2))
    assert e.value.reason == "apply" and "disk on fire" in str(e.value)


def test_versions_and_deletions_win_over_arrival_order() -> None:
    state, s = stream()
    s.receive(page(0, pol("a", version=3, amount="3"), last=True, seq=1))
    s.receive(change(2, policy_changes=dp.PolicyChanges(upserts=[pol("a", 2, amount="2")])))
    assert state.index.policies["a"].amount_nanos == 3 * 10**9  # older version ignored
    s.receive(change(3, policy_changes=dp.PolicyChanges(upserts=[pol("a", 4, amount="4")])))
    assert state.index.policies["a"].amount_nanos == 4 * 10**9
    s.receive(change(4, policy_changes=dp.PolicyChanges(deleted_ids=["a"])))
    s.receive(change(5, policy_changes=dp.PolicyChanges(upserts=[pol("a", 5)])))
    assert "a" not in state.index.policies  # a deleted id stays deleted

    # A resync that no longer lists it, then a late change: still deleted.
    s.receive(page(0, pol("b"), last=True, seq=10))
    s.receive(change(11, policy_changes=dp.PolicyChanges(upserts=[pol("a", 6)])))
    assert list(state.index.policies) == ["b"]

    o1 = pp.PriceOverride(id="po_1", model="gpt-4o", update_time=timestamp(20))
    old = pp.PriceOverride(id="po_1", model="old", update_time=timestamp(10))
    s.receive(change(12, price_changes=dp.PriceOverrideChanges(upserts=[o1])))
    s.receive(change(13, price_changes=dp.PriceOverrideChanges(upserts=[old])))
    assert [o.model for o in state.overrides.message().overrides] == ["gpt-4o"]
    s.receive(change(14, price_changes=dp.PriceOverrideChanges(deleted_ids=["po_1"])))
    assert list(state.overrides.message().overrides) == []


def test_an_earlier_control_planes_whole_snapshot_and_unnumbered_changes() -> None:
    state, s = stream()
    whole = dp.StateUpdate(
        full_snapshot=True,
        policies=dp.PolicySnapshot(policies=[pol("a").policy, pol("b").policy]),
        spend=[spend("a", 1)],
    )
    assert s.receive(whole) is Received.SYNCED
    assert s.receive(dp.StateUpdate(policies=dp.PolicySnapshot(policies=[pol("b").policy])))
    assert list(state.index.policies) == ["b"]


def test_snapshots_of_this_and_the_earlier_format_are_read_back(tmp_path: Path) -> None:
    before, s = stream()
    override = pp.PriceOverride(id="po_1", model="gpt-4o", price=pp.Price(input="1", output="2"))
    s.receive(
        dp.StateUpdate(
            resync=dp.ResyncPage(last=True),
            seq=1,
            policy_changes=dp.PolicyChanges(upserts=[pol("a", 7)]),
            price_changes=dp.PriceOverrideChanges(upserts=[override]),
            spend=[spend("a", 42, member="")],
        )
    )
    snapshot.save(tmp_path, before.saved_state())
    after = LocalState()
    saved = snapshot.load(tmp_path)
    assert saved is not None
    after.apply_update(saved, NOW)
    assert list(after.index.policies) == ["a"] and after.policy_set.msgs["a"].version == 7
    assert after.spent(("a", "", DAY_START)) == 42 and not after.synced
    assert [o.id for o in after.overrides.message().overrides] == ["po_1"]

    # A file written by the earlier release: whole sets.
    earlier = dp.StateUpdate(
        policies=dp.PolicySnapshot(policies=[pol("old").policy]),
        price_overrides=dp.PriceOverrides(overrides=[override]),
        spend=[spend("old", 9)],
    )
    snapshot.save(tmp_path, earlier)
    from_earlier = LocalState()
    loaded = snapshot.load(tmp_path)
    assert loaded is not None
    from_earlier.apply_update(loaded, NOW)
    assert list(from_earlier.index.policies) == ["old"]
    assert from_earlier.spent(("old", "", DAY_START)) == 9
    assert [o.id for o in from_earlier.overrides.message().overrides] == ["po_1"]
