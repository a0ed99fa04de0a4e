"""Names are unique per kind (migration 0015): existing duplicates are renamed
deterministically and reported; then the control plane refuses a taken name
with ALREADY_EXISTS naming the field (policies and webhooks)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from structlog.testing import capture_logs

from control_plane import names
from control_plane.errors import AlreadyExists
from control_plane.service import ControlPlane
from control_plane.store.db import alembic_config, create_db_engine, migrate
from tests.store.builders import policy

T = datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None)


def _insert(conn: Any, table: str, row_id: str, name: str, minutes: int) -> None:
    when = T + timedelta(minutes=minutes)
    common = {"id": row_id, "name": name, "description": "", "create_time": when}
    common |= {"update_time": when, "created_by": "a", "updated_by": "a", "version": 1}
    if table == "budget_policies":
        row = common | {
            "amount_nanos": 1,
            "window_unit": "DAYS",
            "window_count": 1,
            "week_start": 0,
            "timezone": "UTC",
            "action": "ALERT",
            "scope": "GLOBAL",
            "target": "",
            "alert_thresholds": "",
            "enabled": True,
        }
    else:
        row = common | {
            "url": "https://hooks.example.com/x",
            "format": "generic",
            "events": "budget_policy.exceeded",
            "secret": "",
            "routing_key": "",
            "severity": "error",
            "resolve_on_reset": True,
            "enabled": True,
        }
    columns = ", ".join(row)
    values = ", ".join(":" + k for k in row)
    conn.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)


def test_migration_renames_duplicates_oldest_first(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        command.upgrade(alembic_config(engine), "0011")
        with engine.begin() as conn:
            # Inserted out of age order; "ops (2)" is already taken.
            _insert(conn, "budget_policies", "bp_c", "ops", 3)
            _insert(conn, "budget_policies", "bp_a", "ops", 1)
            _insert(conn, "budget_policies", "bp_b", "ops", 2)
            _insert(conn, "budget_policies", "bp_d", "ops (2)", 0)
            _insert(conn, "budget_policies", "bp_e", "x" * 200, 0)
            _insert(conn, "budget_policies", "bp_f", "x" * 200, 1)
            _insert(conn, "webhooks", "wh_b", "hook", 1)
            _insert(conn, "webhooks", "wh_a", "hook", 1)  # same age: by id
        with capture_logs() as logs:
            migrate(engine)
        with engine.connect() as conn:
            policies = dict(conn.execute(text("SELECT id, name FROM budget_policies")).all())
            hooks = dict(conn.execute(text("SELECT id, name FROM webhooks")).all())
            markers = conn.execute(text("SELECT apply_marker FROM budget_policies")).all()
    finally:
        engine.dispose()
    assert policies == {
        "bp_a": "ops",
        "bp_b": "ops (3)",
        "bp_c": "ops (4)",
        "bp_d": "ops (2)",
        "bp_e": "x" * 200,
        "bp_f": "x" * 196 + " (2)",
    }
    assert hooks == {"wh_a": "hook", "wh_b": "hook (2)"}
    assert {m for (m,) in markers} == {""}
    renames = [e for e in logs if "renamed" in e["event"]]
    assert [(e.get("policy_id") or e.get("webhook_id"), e["new_name"]) for e in renames] == [
        ("bp_f", "x" * 196 + " (2)"),
        ("bp_b", "ops (3)"),
        ("bp_c", "ops (4)"),
        ("wh_b", "hook (2)"),
    ]
    assert all(e["log_level"] == "warning" and e["old_name"] for e in renames)


async def test_a_taken_name_is_refused(cp: ControlPlane) -> None:
    first = await cp.create_policy(policy("team"), "admin")
    other = await cp.create_policy(policy("other"), "admin")
    with pytest.raises(AlreadyExists) as e:
        await cp.create_policy(policy("team"), "admin")
    assert e.value.field == "name"
    assert str(e.value) == f"name: a policy named 'team' already exists ({first.id})"

    def rename(stored: Any) -> Any:
        stored.name = "team"
        return stored

    with pytest.raises(AlreadyExists, match=f"'team' already exists \\({first.id}\\)"):
        await cp.update_policy(other.id, rename, "", "admin")
    # Its own name is no conflict; a freed name can be taken again.
    await cp.update_policy(first.id, rename, "", "admin")
    await cp.delete_policy(first.id, "", "admin")
    assert (await cp.create_policy(policy("team"), "admin")).name == "team"


async def test_a_concurrent_writer_gets_the_same_answer(
    cp: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two creates that both pass the check (a race): the unique index
    refuses the second, with ALREADY_EXISTS too."""
    await cp.create_policy(policy("raced"), "admin")
    monkeypatch.setattr(names, "check_free", lambda *args: None)
    with pytest.raises(AlreadyExists, match=r"^name: a policy named 'raced' already exists$"):
        await cp.create_policy(policy("raced"), "admin")
    other = await cp.create_policy(policy("other"), "admin")

    def rename(stored: Any) -> Any:
        stored.name = "raced"
        return stored

    with pytest.raises(AlreadyExists, match=r"^name: a policy named 'raced' already exists$"):
        await cp.update_policy(other.id, rename, "", "admin")
