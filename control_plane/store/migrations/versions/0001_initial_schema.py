"""initial schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "applied_batches",
        sa.Column("batch_id", sa.String(length=80), nullable=False),
        sa.Column("data_plane_id", sa.String(length=200), nullable=False),
        sa.Column("applied_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_applied_batches")),
    )
    with op.batch_alter_table("applied_batches", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_applied_batches_applied_at"), ["applied_at"], unique=False
        )

    op.create_table(
        "budget_policies",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("window_unit", sa.String(length=16), nullable=False),
        sa.Column("window_count", sa.Integer(), nullable=False),
        sa.Column("week_start", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("alert_thresholds", sa.String(length=200), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.DateTime(), nullable=False),
        sa.Column("update_time", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_policies")),
    )
    op.create_table(
        "window_spend",
        sa.Column("policy_id", sa.String(length=40), nullable=False),
        sa.Column("member", sa.String(length=512), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("window_end", sa.BigInteger(), nullable=False),
        sa.Column("spent_nanos", sa.BigInteger(), nullable=False),
        sa.Column("request_count", sa.BigInteger(), nullable=False),
        sa.Column("estimated_count", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "policy_id", "member", "window_start", name=op.f("pk_window_spend")
        ),
    )
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.create_index("ix_window_spend_window_end", ["window_end"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.drop_index("ix_window_spend_window_end")

    op.drop_table("window_spend")
    op.drop_table("budget_policies")
    with op.batch_alter_table("applied_batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_applied_batches_applied_at"))

    op.drop_table("applied_batches")
