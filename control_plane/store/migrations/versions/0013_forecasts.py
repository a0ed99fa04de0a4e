"""exhaustion forecasts: a policy's forecast_alert and each window's spend rate

Revision ID: 0013
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_rates",
        sa.Column("policy_id", sa.String(length=40), nullable=False),
        sa.Column("member", sa.String(length=512), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("window_end", sa.BigInteger(), nullable=False),
        sa.Column("decayed_nanos", sa.Float(precision=53), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_ms", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "policy_id", "member", "window_start", name=op.f("pk_window_rates")
        ),
    )
    with op.batch_alter_table("window_rates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_window_rates_window_end"), ["window_end"], unique=False
        )
    # Server defaults: existing policies (and replicas of the previous
    # release, which do not name the columns) have no forecast alert.
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
    with op.batch_alter_table("window_rates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_window_rates_window_end"))
    op.drop_table("window_rates")
