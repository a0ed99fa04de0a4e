"""quarantined usage: records that could not be encoded, sent or applied

Revision ID: 0006
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantined_usage",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("data_plane_id", sa.String(length=200), nullable=False),
        sa.Column("batch_id", sa.String(length=80), nullable=False),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("member", sa.String(length=256), nullable=False),
        sa.Column("member_bytes", sa.BigInteger(), nullable=False),
        sa.Column("member_sha256", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("request_count", sa.BigInteger(), nullable=False),
        sa.Column("quarantine_time", sa.DateTime(), nullable=False),
        sa.Column("create_time", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantined_usage")),
    )
    with op.batch_alter_table("quarantined_usage", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_quarantined_usage_create_time"), ["create_time"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("quarantined_usage", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quarantined_usage_create_time"))
    op.drop_table("quarantined_usage")
