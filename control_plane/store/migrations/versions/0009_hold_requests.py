"""window holds: how many running requests each hold includes

Revision ID: 0009
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("window_holds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("window_holds", schema=None) as batch_op:
        batch_op.drop_column("requests")
