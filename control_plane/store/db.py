"""Engine creation and schema migration (alembic, run at start-up)."""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
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
            ensure_exp(dbapi_conn)

        return engine
    return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def ensure_exp(dbapi_conn: Any) -> None:
    """SQLite's exp() (the spend-rate upsert uses it) is only there when
    SQLite was built with its math functions: define it otherwise."""
    try:
        dbapi_conn.execute("SELECT exp(0)").fetchone()
    except sqlite3.OperationalError:
        dbapi_conn.create_function("exp", 1, _exp, deterministic=True)


def _exp(x: float | None) -> float | None:
    if x is None:
        return None
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


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
