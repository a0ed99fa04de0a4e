"""ext_proc/sync/snapshot.py: the control plane's last word kept on disk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from ext_proc.sync import snapshot
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
