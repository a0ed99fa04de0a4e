"""unique names per kind, and the `spendgate apply` marker

Policy and webhook names become unique (``spendgate apply`` and every CLI
command find objects by name). Existing duplicates are renamed first,
deterministically: the oldest keeps its name (create_time, then id), the
others become "name (2)", "name (3)", ... (skipping names already taken),
each rename logged at warning level with the id, the old and the new name.

``apply_marker`` (policies, webhooks, price overrides) is empty for objects
made by hand and set by ``spendgate apply`` on what it creates (see
docs/policies-as-code.md): ``--prune`` deletes only marked objects.

Revision ID: 0015
Revises: 0012
"""

import sqlalchemy as sa
import structlog
from alembic import op

revision = "0015"
down_revision = "0012"
branch_labels = None
depends_on = None

log = structlog.get_logger("spendgate.control_plane")
MAX_NAME = 200  # the name columns' length
TABLES = {"budget_policies": "policy", "webhooks": "webhook"}


def renamed(name: str, n: int, taken: set[str]) -> str:
    """``name`` with the first free " (k)" suffix, k >= n, cut to fit."""
    while True:
        suffix = f" ({n})"
        candidate = name[: MAX_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def dedupe(table: str, kind: str) -> None:
    conn = op.get_bind()
    t = sa.table(
        table, sa.column("id", sa.String), sa.column("name", sa.String), sa.column("create_time")
    )
    rows = conn.execute(sa.select(t.c.id, t.c.name).order_by(t.c.create_time, t.c.id)).all()
    taken = {r.name for r in rows}
    seen: set[str] = set()
    for row in rows:
        if row.name not in seen:
            seen.add(row.name)
            continue
        new = renamed(row.name, 2, taken)
        taken.add(new)
        seen.add(new)
        conn.execute(sa.update(t).where(t.c.id == row.id).values(name=new))
        log.warning(
            f"{kind} renamed: its name was not unique",
            **{f"{kind}_id": row.id},
            old_name=row.name,
            new_name=new,
        )


def upgrade() -> None:
    for table, kind in TABLES.items():
        dedupe(table, kind)
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_unique_constraint(f"uq_{table}_name", ["name"])
    for table in (*TABLES, "price_overrides"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("apply_marker", sa.String(length=200), nullable=False, server_default="")
            )


def downgrade() -> None:
    for table in (*TABLES, "price_overrides"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("apply_marker")
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f"uq_{table}_name", type_="unique")
