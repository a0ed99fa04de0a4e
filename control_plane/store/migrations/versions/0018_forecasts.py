"""exhaustion forecasts: a policy's forecast_alert and each window's spend rate

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

RATE_COLUMNS = ("rate_first_nanos", "rate_at_ms", "rate_since_ms", "rate_last_ms", "rate_samples")


def upgrade() -> None:
    # Server defaults: existing rows (and replicas of the previous release,
    # which do not name the columns) have no rate yet and no forecast alert.
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("rate_nanos", sa.Float(precision=53), nullable=False, server_default="0")
        )
        for name in RATE_COLUMNS:
            batch_op.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )
    with op.batch_alter_table("budget_policies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("forecast_within_s", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column(
                "forecast_before_end",
                sa.Boolean(),
                nullable=False,
                server_default=sa.text("false"),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("budget_policies", schema=None) as batch_op:
        batch_op.drop_column("forecast_before_end")
        batch_op.drop_column("forecast_within_s")
    with op.batch_alter_table("window_spend", schema=None) as batch_op:
        for name in reversed(RATE_COLUMNS):
            batch_op.drop_column(name)
        batch_op.drop_column("rate_nanos")
