"""sealed secrets: webhook URLs, signing secrets and routing keys encrypted

Revision ID: 0005
Revises: 0004

The columns become TEXT (a ciphertext is longer than its plaintext) and
``url_masked`` keeps the URL as the API shows it. Existing rows are encrypted
under the current key of the keyring ``migrate`` was given (the control
plane's ``secrets_key_file`` / ``secrets_key``). A database that holds
webhooks and no key configured is refused before anything changes: the
operator sets a key and starts again, and no secret stays in clear.
"""

import sqlalchemy as sa
from alembic import context, op

from control_plane.keyring import KEY_SETTINGS, SecretsKeyRequired, is_encrypted
from control_plane.webhooks import sealed
from spendgate.domain.webhook_urls import masked_url

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

webhooks = sa.table(
    "webhooks",
    sa.column("id", sa.String),
    sa.column("url", sa.Text),
    sa.column("url_masked", sa.Text),
    sa.column("secret", sa.Text),
    sa.column("routing_key", sa.Text),
)


def upgrade() -> None:
    bind = op.get_bind()
    keyring = context.config.attributes.get("keyring")
    rows = bind.execute(
        sa.select(webhooks.c.id, webhooks.c.url, webhooks.c.secret, webhooks.c.routing_key)
    ).all()
    if rows and keyring is None:
        raise SecretsKeyRequired(
            f"migration 0005 encrypts the {len(rows)} stored webhook(s) (URLs, secrets, "
            f"routing keys) and no key is configured: set {KEY_SETTINGS} "
            "(`spendgate secrets new-key` makes one) and start again; nothing was changed"
        )
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        for column, length in (("url", 2048), ("secret", 200), ("routing_key", 200)):
            batch_op.alter_column(
                column,
                existing_type=sa.String(length=length),
                type_=sa.Text(),
                existing_nullable=False,
            )
        batch_op.add_column(
            sa.Column("url_masked", sa.Text(), nullable=False, server_default=sa.text("''"))
        )
    for row in rows:
        values = {"url_masked": masked_url(row.url)}
        for column in sealed.COLUMNS:
            value = getattr(row, column)
            if not is_encrypted(value):
                values[column] = sealed.seal(keyring, column, row.id, value)
        bind.execute(sa.update(webhooks).where(webhooks.c.id == row.id).values(**values))


def downgrade() -> None:
    """Back to 0004's clear columns (what an older release reads): only
    with the key, and only for an operator who runs alembic by hand."""
    bind = op.get_bind()
    keyring = context.config.attributes.get("keyring")
    rows = bind.execute(
        sa.select(webhooks.c.id, webhooks.c.url, webhooks.c.secret, webhooks.c.routing_key)
    ).all()
    for row in rows:
        values = {c: sealed.unseal(keyring, c, row.id, getattr(row, c)) for c in sealed.COLUMNS}
        bind.execute(sa.update(webhooks).where(webhooks.c.id == row.id).values(**values))
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_column("url_masked")
        for column, length in (("url", 2048), ("secret", 200), ("routing_key", 200)):
            batch_op.alter_column(
                column,
                existing_type=sa.Text(),
                type_=sa.String(length=length),
                existing_nullable=False,
            )
