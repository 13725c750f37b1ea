"""backfill tasks.completed_at in batches, then index it without locking writes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:05:00+00:00

Two patterns for a busy production table:

* A data migration in batches, each committed on its own, so no long transaction holds row
  locks or bloats the table while it runs.
* `CREATE INDEX CONCURRENTLY`, which PostgreSQL refuses inside a transaction: it runs in
  `autocommit_block()`, with a `lock_timeout` so it gives up instead of queueing behind a long
  transaction (and every query queued behind it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000
LOCK_TIMEOUT = "5s"  # `alembic -x lock_timeout=30s upgrade head` for another value
BACKFILL = sa.text(
    """
    UPDATE tasks SET completed_at = updated_at
     WHERE id IN (SELECT id FROM tasks
                   WHERE status = 'COMPLETED' AND completed_at IS NULL
                   LIMIT :batch FOR UPDATE SKIP LOCKED)
    """
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if op.get_context().as_sql:  # `--sql`: nothing to count, print one statement
            op.execute(
                "UPDATE tasks SET completed_at = updated_at"
                " WHERE status = 'COMPLETED' AND completed_at IS NULL"
            )
        else:
            while op.get_bind().execute(BACKFILL, {"batch": BATCH}).rowcount:
                pass  # each batch commits on its own
        lock_timeout = context.get_x_argument(as_dictionary=True).get("lock_timeout", LOCK_TIMEOUT)
        op.execute(
            sa.text("SELECT set_config('lock_timeout', :value, false)").bindparams(
                value=lock_timeout
            )
        )
        op.create_index(
            op.f("ix_tasks_completed_at"),
            "tasks",
            ["completed_at"],
            postgresql_concurrently=True,
            if_not_exists=True,  # a retry after a timeout finds a half-built index otherwise
        )
        op.execute("RESET lock_timeout")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            op.f("ix_tasks_completed_at"),
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )
