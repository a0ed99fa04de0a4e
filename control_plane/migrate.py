"""``python -m control_plane.migrate``: bring the database schema to the
newest alembic revision, then exit.

The control plane does the same at every start (control_plane/store/db.py
``migrate``), so this is optional: it lets an upgrade run the migrations once,
as its own step (a Kubernetes Job, a deploy pipeline), before new replicas
start. It reads the same settings as the server (``--config``, environment,
``--database-url``), the secrets key included: migration 0005 encrypts the
webhook secrets an earlier release stored in clear.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import Engine

from control_plane import keyring
from control_plane.config import ConfigError, load_settings
from control_plane.keyring import SecretsKeyRequired
from control_plane.store.db import create_db_engine, migrate


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m control_plane.migrate",
        description="Apply the database migrations (alembic upgrade head) and exit.",
    )
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--database-url", help="sqlite:///path or postgresql://...")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(file=args.config, database_url=args.database_url)
        keys = keyring.load(settings.secrets_key_file, settings.secrets_key)
    except ConfigError as e:
        print(f"spendgate migrate: bad configuration: {e}", file=sys.stderr)
        return 2
    url = settings.database_url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        before = current_revision(engine)
        migrate(engine, keys)
        after = current_revision(engine)
    except CommandError as e:
        # E.g. the database is at a revision of a newer release.
        print(f"spendgate migrate: {where}: {e}", file=sys.stderr)
        return 1
    except SecretsKeyRequired as e:
        print(f"spendgate migrate: bad configuration: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if before == after:
        print(f"{where}: schema already at {after}")
    else:
        print(f"{where}: schema migrated from {before or 'empty'} to {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
