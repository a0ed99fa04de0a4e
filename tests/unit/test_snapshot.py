"""ext_proc/sync/snapshot.py: the control plane's last word kept on disk."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from ext_proc.config import Settings
from ext_proc.sync import snapshot
from ext_proc.sync.client import ControlPlaneSync
from ext_proc.sync.journal import Journal
from ext_proc.sync.state import LocalState
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
NOW = datetime(2025, 3, 10, 12, tzinfo=UTC)


def update() -> dp.StateUpdate:
    policy = pb.BudgetPolicy(
        id="bp_1",
        name="daily",
        amount_usd="1",
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        action=pb.ACTION_REJECT,
        scope=pb.SCOPE_GLOBAL,
        enabled=True,
    )
    return dp.StateUpdate(
        full_snapshot=True,
        policies=dp.PolicySnapshot(policies=[policy]),
        spend=[
            dp.WindowSpend(
                policy_id="bp_1",
                window_start=timestamp(DAY_START),
                window_end=timestamp(DAY_START + 86400),
                spent_nanos=7,
            )
        ],
    )


def test_what_was_saved_is_enforced_after_a_restart(tmp_path: Path) -> None:
    before = LocalState()
    before.apply_update(update(), NOW)
    snapshot.save(tmp_path, before.saved_state())
    assert not before.snapshot_dirty

    after = LocalState()
    saved = snapshot.load(tmp_path)
    assert saved is not None
    after.apply_update(saved, NOW)
    assert not after.synced  # the control plane has not spoken yet
    assert list(after.index.policies) == ["bp_1"]
    assert after.spent(("bp_1", "", DAY_START)) == 7


def test_a_missing_or_damaged_file_is_a_start_without_it(tmp_path: Path) -> None:
    assert snapshot.load(tmp_path) is None
    (tmp_path / snapshot.FILE_NAME).write_bytes(b"\xff\xff\xff not a message")
    assert snapshot.load(tmp_path) is None


# -- saving off the event loop -------------------------------------------------


def large_update(windows: int) -> dp.StateUpdate:
    """One ``*`` policy with ``windows`` members' window totals."""
    u = update()
    del u.spend[:]
    u.spend.extend(
        dp.WindowSpend(
            policy_id="bp_1",
            member=f"user-{i}",
            window_start=timestamp(DAY_START),
            window_end=timestamp(DAY_START + 86400),
            spent_nanos=i,
        )
        for i in range(windows)
    )
    return u


def test_the_event_loop_keeps_serving_while_a_large_state_is_saved(tmp_path: Path) -> None:
    state = LocalState()
    state.apply_update(large_update(100_000), NOW)
    state.journal = Journal(tmp_path)
    served = 0
    during = 0

    async def run() -> None:
        nonlocal served, during
        sync = ControlPlaneSync(
            Settings(data_plane_token="data-plane-token-0123", control_plane="127.0.0.1:1"),
            state,
            lambda: NOW,
        )
        stop = False

        def tick() -> None:  # a callback of the loop, as each served message is
            nonlocal served
            served += 1
            if not stop:
                asyncio.get_running_loop().call_soon(tick)

        tick()
        before = served
        await sync.save_state()
        during = served - before
        stop = True
        await sync._channel.close()

    asyncio.run(run())
    # Saved in one blocking call, the loop would run no callback until it ended.
    assert during > 0
    saved = snapshot.load(tmp_path)
    assert saved is not None
    assert len(saved.spend) == 100_000
    assert saved == state.saved_state()


def test_a_copy_is_what_was_there_when_taken(tmp_path: Path) -> None:
    state = LocalState()
    state.apply_update(update(), NOW)
    parts = state.snapshot_parts()
    assert not state.snapshot_dirty
    state.apply_update(large_update(3), NOW)  # changes after the copy
    assert state.snapshot_dirty
    assert snapshot.write(tmp_path, parts)
    saved = snapshot.load(tmp_path)
    assert saved is not None
    assert [(s.member, s.spent_nanos) for s in saved.spend] == [("", 7)]


def test_an_older_copy_never_replaces_a_newer_one(tmp_path: Path) -> None:
    state = LocalState()
    state.apply_update(update(), NOW)
    older = state.snapshot_parts()
    state.apply_update(large_update(2), NOW)
    newer = state.snapshot_parts()
    assert snapshot.write(tmp_path, newer)
    assert not snapshot.write(tmp_path, older)  # a save that finished late
    saved = snapshot.load(tmp_path)
    assert saved is not None
    assert saved == snapshot.build(newer)
    assert len(saved.spend) == 2  # the newer copy: two members (a full snapshot)
    assert not (tmp_path / "snapshot.tmp").exists()


def test_pieces_parse_as_the_one_message(tmp_path: Path) -> None:
    state = LocalState()
    state.apply_update(large_update(10), NOW)
    parts = state.snapshot_parts()
    whole = dp.StateUpdate(
        spend=[
            dp.WindowSpend(
                policy_id=k[0],
                member=k[1],
                window_start=timestamp(k[2]),
                window_end=timestamp(v[1]),
                spent_nanos=v[0],
            )
            for k, v in state.remote.items()
        ],
        policy_changes=dp.PolicyChanges(upserts=state.policy_set.msgs.values()),
        price_changes=dp.PriceOverrideChanges(),
    )
    assert len(whole.spend) == 10 and len(whole.policy_changes.upserts) == 1
    for chunk in (1, 3, 10, 2000):
        assert dp.StateUpdate.FromString(snapshot.encode(parts, chunk)) == whole
    empty = LocalState().snapshot_parts()
    decoded = dp.StateUpdate.FromString(snapshot.encode(empty))
    assert decoded.HasField("policy_changes") and decoded.HasField("price_changes")
    assert not decoded.spend
