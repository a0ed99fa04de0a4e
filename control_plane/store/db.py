"""Engine creation and schema migration (alembic, run at start-up)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from control_plane.keyring import Keyring

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use psycopg 3 for them."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def restrict_sqlite_files(database: str) -> None:
    """Make the SQLite file (created empty if absent) and its -wal, -shm and
    -journal files mode 0600: they hold budgets, spend and encrypted secrets.
    SQLite gives the files it creates the database file's mode, so creating
    it 0600 first covers them; the chmod fixes files of earlier releases."""
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


def create_db_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            restrict_sqlite_files(database)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run while the single writer commits.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def alembic_config(engine: Engine, keyring: Keyring | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    # Migrations that encrypt stored secrets (0005) take the key from here.
    cfg.attributes["keyring"] = keyring
    return cfg


def migrate(engine: Engine, keyring: Keyring | None = None) -> None:
    """Bring the schema to the newest revision (safe to run on every start).
    ``keyring`` encrypts secrets stored in clear by an earlier release; without
    it a database holding webhooks cannot pass migration 0005."""
    command.upgrade(alembic_config(engine, keyring), "head")
