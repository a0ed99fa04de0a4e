"""Alembic environment: the engine comes from control_plane.store.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from control_plane.store.models import Base

# Any 64-bit number unique to spendgate: replicas starting together on one
# PostgreSQL take turns, so only the first creates the schema and the others
# find it done.
MIGRATION_LOCK = 0x5BE9D6A7E5

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()
