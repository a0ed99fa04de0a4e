"""usage rollups and their tag sets (chargeback reports)

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("key_hash", sa.String(length=32), nullable=False),
        sa.Column("route", sa.String(length=512), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=512), nullable=False),
        sa.Column("user_name", sa.String(length=512), nullable=False),
        sa.Column("workspace", sa.String(length=512), nullable=False),
        sa.Column("api_key_hash", sa.String(length=128), nullable=False),
        sa.Column("tag_set", sa.String(length=32), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("request_count", sa.BigInteger(), nullable=False),
        sa.Column("estimated_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "key_hash", name=op.f("pk_usage_rollups")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Rows are updated far more often than inserted (the same hour and
        # dimensions, batch after batch): room in each page lets PostgreSQL
        # update them in place (HOT), without touching the index.
        op.execute("ALTER TABLE usage_rollups SET (fillfactor = 70)")
    op.create_table(
        "rollup_tags",
        sa.Column("tag_set", sa.String(length=32), nullable=False),
        sa.Column("tag_key", sa.String(length=512), nullable=False),
        sa.Column("tag_value", sa.String(length=512), nullable=False),
        sa.PrimaryKeyConstraint("tag_set", "tag_key", name=op.f("pk_rollup_tags")),
    )


def downgrade() -> None:
    op.drop_table("rollup_tags")
    op.drop_table("usage_rollups")
