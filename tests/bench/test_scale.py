"""`python -m bench scale` in its quick configuration, on SQLite and
PostgreSQL: the bulk load reaches ext_proc by its resync, every measurement
runs through the real processes, policy changes are seen applied through
Envoy, and the rollover frees every window. No timing is asserted (the
numbers are the benchmark's business); the counts and the table's shape are."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bench import scale
from control_plane.store.db import create_db_engine
from control_plane.store.models import PolicyRow, WindowSpendRow

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "QUICK", True)
    monkeypatch.setattr(scale, "CHANGES", 2)


def test_fill_inserts_the_policies_and_the_members_of_one_wildcard(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fill.db"
    wildcard = scale.fill(url, scale.Size(policies=7, members=12_345), datetime.now(UTC))
    engine = create_db_engine(url)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(PolicyRow)) == 7
        assert s.get(PolicyRow, wildcard).target == "*"  # type: ignore[union-attr]
        members = s.scalars(select(WindowSpendRow.member).distinct()).all()
        assert len(members) == 12_345
        assert set(s.scalars(select(WindowSpendRow.policy_id).distinct())) == {wildcard}
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_one_size_is_measured_end_to_end(kind: str) -> None:
    out = scale.measure(kind, scale.Size(policies=10, members=500))
    assert out[0] == f"{kind}, 10 policies / 500 members"
    labels = [line[:46].strip() for line in out[1:]]
    assert labels == [
        "bulk load s",
        "start + sync s",
        "ext_proc busy after sync s",
        "ext_proc RSS MB",
        "admission c=1 p50 / p99 ms",
        "ext_proc CPU / request ms",
        "ext_proc RSS MB after",
        "status / spend --policy s",
        "create p50 ms (of 2)",
        "update p50 ms (of 2)",
    ]
    # Every measured cell is a number; memory, CPU and the change times are
    # above zero, and a change is applied after the admin call returned.
    cells = {
        line[:46].strip(): line[46:].replace("applied", "").replace("CPU", "").split()
        for line in out[1:]
    }
    assert all(c and all(float(x) >= 0 for x in c) for c in cells.values()), out
    for label in ("ext_proc RSS MB", "ext_proc CPU / request ms"):
        assert float(cells[label][0]) > 0, out
    for label in ("create p50 ms (of 2)", "update p50 ms (of 2)"):
        call, applied = map(float, cells[label])
        assert 0 < call <= applied, out


def test_rollover_forgets_every_ended_window() -> None:
    r = scale.rollover(12_000)  # asserts that the state is empty after the boundary
    assert r.feed_ms > 0 and r.boundary_ms > 0
    # More windows than one slice: the rest went in further slices.
    assert 0 < r.slice_ms <= r.all_ms and r.stall_ms > 0
