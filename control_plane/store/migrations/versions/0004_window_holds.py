"""window holds: what each data plane holds against a window (reservations)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_holds",
        sa.Column("policy_id", sa.String(length=40), nullable=False),
        sa.Column("member", sa.String(length=512), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("data_plane_id", sa.String(length=200), nullable=False),
        sa.Column("held_nanos", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "policy_id", "member", "window_start", "data_plane_id", name=op.f("pk_window_holds")
        ),
    )
    with op.batch_alter_table("window_holds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_window_holds_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("window_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_window_holds_expires_at"))
    op.drop_table("window_holds")
