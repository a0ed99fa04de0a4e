"""window spend top: an index for a wildcard policy's top spenders and member counts

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Built while the table is locked for writes: on a large table, expect
    # usage to wait for it (about a second per million rows).
    op.create_index(
        "ix_window_spend_top",
        "window_spend",
        ["policy_id", "window_start", "spent_nanos"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_window_spend_top", table_name="window_spend")
