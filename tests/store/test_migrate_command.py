"""`python -m control_plane.migrate` on both databases: brings an empty
database to the newest revision, is a no-op the second time, and refuses a
database of a newer release or a bad configuration with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from control_plane import migrate as migrate_command
from control_plane.store.db import alembic_config, create_db_engine
from tests.harness import ADMIN_TOKEN


@pytest.fixture(autouse=True)
def server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same settings as the server: the admin token is required there too.
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", ADMIN_TOKEN)


def revisions(url: str) -> tuple[str | None, str | None]:
    engine = create_db_engine(url)
    try:
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        return migrate_command.current_revision(engine), head
    finally:
        engine.dispose()


def test_migrates_an_empty_database_then_does_nothing(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    current, head = revisions(db_url)
    assert current is None and head is not None
    assert migrate_command.main(["--database-url", db_url]) == 0
    assert f"schema migrated from empty to {head}" in capsys.readouterr().out
    assert revisions(db_url) == (head, head)
    assert migrate_command.main(["--database-url", db_url]) == 0
    assert f"schema already at {head}" in capsys.readouterr().out


def test_a_database_of_a_newer_release_is_refused(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert migrate_command.main(["--database-url", db_url]) == 0
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    assert migrate_command.main(["--database-url", db_url]) == 1
    assert "'9999'" in capsys.readouterr().err


def test_bad_configuration_exits_2_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("SPENDGATE_ADMIN_TOKEN")
    assert migrate_command.main(["--database-url", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert "admin_token" in capsys.readouterr().err
