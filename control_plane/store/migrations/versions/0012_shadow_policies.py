"""shadow policies and budget headers: enforcement, shadow_since,
expose_to_clients on policies; would-reject counts per window

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Server defaults: existing rows (and replicas of the previous release,
    # which do not name these columns) are enforced, unexposed, count 0.
    with op.batch_alter_table("budget_policies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "enforcement", sa.String(length=16), nullable=False, server_default="ENFORCED"
            )
        )
        batch_op.add_column(sa.Column("shadow_since", sa.DateTime(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "expose_to_clients", sa.Boolean(), nullable=False, server_default=sa.text("false")
            )
        )
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("would_reject_count", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.drop_column("would_reject_count")
    with op.batch_alter_table("budget_policies", schema=None) as batch_op:
        batch_op.drop_column("expose_to_clients")
        batch_op.drop_column("shadow_since")
        batch_op.drop_column("enforcement")
