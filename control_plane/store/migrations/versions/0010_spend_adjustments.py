"""spend adjustments: audited corrections of a window's spend

Revision ID: 0010
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spend_adjustments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("policy_id", sa.String(length=40), nullable=False),
        sa.Column("policy_name", sa.String(length=200), nullable=False),
        sa.Column("member", sa.String(length=512), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("window_end", sa.BigInteger(), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("spent_before_nanos", sa.BigInteger(), nullable=False),
        sa.Column("spent_after_nanos", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("create_time", sa.DateTime(), nullable=False),
        sa.Column("request_id", sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spend_adjustments")),
        sa.UniqueConstraint("request_id", name=op.f("uq_spend_adjustments_request_id")),
    )
    with op.batch_alter_table("spend_adjustments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_spend_adjustments_policy_member", ["policy_id", "member", "id"], unique=False
        )
    # Added with a server default, so existing rows (and replicas of the
    # previous release, which do not name them) get 0.
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("adjusted_nanos", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("adjustment_count", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.drop_column("adjustment_count")
        batch_op.drop_column("adjusted_nanos")
    with op.batch_alter_table("spend_adjustments", schema=None) as batch_op:
        batch_op.drop_index("ix_spend_adjustments_policy_member")
    op.drop_table("spend_adjustments")
