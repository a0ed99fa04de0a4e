"""ext_proc's view of adjusted window totals (WindowSpend.adjustment_seq):
an adjustment may lower a total; stale totals never win."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ext_proc.sync import snapshot
from ext_proc.sync.state import LocalState
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAY_END = int(datetime(2025, 3, 11, tzinfo=UTC).timestamp())
KEY = ("daily", "", DAY_START)


def total(spent: int, seq: int = 0) -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=KEY[0],
        member=KEY[1],
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_END),
        spent_nanos=spent,
        adjustment_seq=seq,
    )


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param([total(1000), total(200, 1)], 200, id="adjustment-lowers"),
        pytest.param([total(200, 1), total(1000)], 200, id="stale-pre-adjustment-ignored"),
        pytest.param([total(200, 1), total(300, 1)], 300, id="usage-after-adjustment-adds"),
        pytest.param([total(300, 1), total(200, 1)], 300, id="same-seq-keeps-the-max"),
        pytest.param([total(900, 1), total(50, 2), total(800, 1)], 50, id="newer-seq-wins"),
        pytest.param([total(50, 2), total(60, 1), total(70, 2)], 70, id="out-of-order"),
    ],
)
def test_merge_orders_totals_by_adjustment_seq(
    messages: list[dp.WindowSpend], expected: int
) -> None:
    state = LocalState()
    for m in messages:
        state.merge_spend([m])
    assert state.remote == {KEY: (expected, DAY_END)}
    assert state.spent(KEY) == expected


def test_full_snapshot_resets_and_saved_state_keeps_the_seq(tmp_path: Path) -> None:
    state = LocalState()
    state.merge_spend([total(1000), total(100, 3)])
    snapshot.save(tmp_path, state.saved_state())
    saved = snapshot.load(tmp_path)
    assert saved is not None and [w.adjustment_seq for w in saved.spend] == [3]
    after = LocalState()
    after.apply_update(saved, NOW)
    after.merge_spend([total(1000, 2)])  # older than what was saved: ignored
    assert after.remote == {KEY: (100, DAY_END)}
    # A full snapshot from the control plane is authoritative again.
    after.apply_update(dp.StateUpdate(full_snapshot=True, spend=[total(40)]), NOW)
    assert after.remote == {KEY: (40, DAY_END)} and after.remote_seq == {}
