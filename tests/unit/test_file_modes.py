"""Files that hold budgets, usage, tokens or keys are mode 0600, also when
the process umask would allow more and when an earlier release left them
wider: the SQLite database and its -wal/-shm, the state directory's
credentials and secrets key, ext_proc's journal, its lock and snapshot."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from control_plane.keyring import load as load_keyring
from control_plane.store.db import create_db_engine, migrate
from ext_proc.sync import snapshot
from ext_proc.sync.journal import FILE_NAME, LOCK_NAME, Journal
from spendgate.cli.credentials import KEY_SETTINGS_ENV, load_or_create_tokens, secrets_key_env
from spendgate.v1 import dataplane_pb2 as dp


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """A umask that would make new files 0644 (the usual default)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_sqlite_database_and_its_wal_and_shm_are_0600(tmp_path: Path) -> None:
    db = tmp_path / "state" / "spendgate.db"
    engine = create_db_engine(f"sqlite:///{db}")
    try:
        migrate(engine)
        with engine.connect() as conn:  # the -wal and -shm exist while a connection is open
            conn.execute(text("SELECT count(*) FROM budget_policies"))
            files = [db, db.with_name("spendgate.db-wal"), db.with_name("spendgate.db-shm")]
            assert all(f.exists() for f in files)
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        engine.dispose()


def test_a_database_an_earlier_release_made_0644_is_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "spendgate.db"
    engine = create_db_engine(f"sqlite:///{db}")
    migrate(engine)
    engine.dispose()
    for f in (db, db.with_name("spendgate.db-wal")):
        f.touch()
        f.chmod(0o644)
    create_db_engine(f"sqlite:///{db}").dispose()
    assert (mode(db), mode(db.with_name("spendgate.db-wal"))) == (0o600, 0o600)


def test_spendgate_up_state_files_are_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*KEY_SETTINGS_ENV, "SPENDGATE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    tokens = load_or_create_tokens(tmp_path)
    env = secrets_key_env(tmp_path)
    key_file = tmp_path / "secrets.key"
    assert env == {"SPENDGATE_CONTROL_PLANE_SECRETS_KEY_FILE": str(key_file)}
    assert (mode(tmp_path / "credentials.json"), mode(key_file)) == (0o600, 0o600)
    ring = load_keyring(str(key_file), "")
    assert ring is not None
    # The next `spendgate up` keeps both: a new key would leave stored secrets unreadable.
    assert secrets_key_env(tmp_path) == env and load_or_create_tokens(tmp_path) == tokens
    assert load_keyring(str(key_file), "") == ring
    # A key given in the environment wins; no file is made for it.
    monkeypatch.setenv("SPENDGATE_CONTROL_PLANE_SECRETS_KEY", "x")
    assert secrets_key_env(tmp_path / "other") == {}
    assert not (tmp_path / "other").exists()


def test_the_usage_journal_and_its_lock_are_0600(tmp_path: Path) -> None:
    older = tmp_path / "older"
    older.mkdir()
    (older / FILE_NAME).write_bytes(b"")
    (older / LOCK_NAME).write_bytes(b"")
    for f in older.iterdir():
        f.chmod(0o644)
    for directory in (tmp_path / "fresh", older):
        journal = Journal(directory, compact_bytes=1)
        try:
            journal.open()
            batch = dp.ReportUsageRequest(batch_id="b1")
            journal.append(batch)
            assert mode(directory / FILE_NAME) == 0o600
            assert mode(directory / LOCK_NAME) == 0o600
            (directory / "usage.v1.tmp").touch(mode=0o644)  # a crashed compaction's leftover
            journal.compact([batch])
            assert mode(directory / FILE_NAME) == 0o600
        finally:
            journal.close()


def test_the_saved_snapshot_is_0600(tmp_path: Path) -> None:
    (tmp_path / "snapshot.tmp").touch(mode=0o644)  # left by a crash mid-save
    snapshot.save(tmp_path, dp.StateUpdate())
    assert mode(tmp_path / snapshot.FILE_NAME) == 0o600
