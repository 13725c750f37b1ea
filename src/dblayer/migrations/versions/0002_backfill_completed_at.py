"""backfill tasks.completed_at in batches, then index it without locking writes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:05:00+00:00

Two patterns for a busy production table:

* A data migration in batches of BATCH rows, walked in primary-key order and each committed on its
  own, so no long transaction holds row locks or bloats the table while it runs. A row the app
  holds locked is waited for, not skipped (SKIP LOCKED would leave it NULL for good).
* `CREATE INDEX CONCURRENTLY`, which PostgreSQL refuses inside a transaction: it runs in
  `autocommit_block()`. While it waits for older transactions to finish, it holds SHARE UPDATE
  EXCLUSIVE on the table: reads and writes go on; VACUUM, ANALYZE and DDL on the table wait. The
  `lock_timeout` (`-x lock_timeout=…`, 5s by default) makes a deploy fail fast instead of waiting
  behind a long transaction; the timeout leaves an INVALID index, which the retry drops and builds
  again. The setting is reset whatever happens, since the connection may go back to the app's pool.
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000
LOCK_TIMEOUT = "5s"  # `alembic -x lock_timeout=30s upgrade head` for another value
INDEX = "ix_tasks_completed_at"
# One batch: the next BATCH ids after the last one seen, in the primary key's order. No SKIP
# LOCKED: a row the app holds locked is waited for, then backfilled, instead of skipped for good.
BACKFILL = sa.text(
    """
    WITH batch AS (
        SELECT id FROM tasks
         WHERE status = 'COMPLETED' AND completed_at IS NULL AND id > :after
         ORDER BY id LIMIT :batch
    ), backfilled AS (
        UPDATE tasks SET completed_at = updated_at
          FROM batch WHERE tasks.id = batch.id AND tasks.completed_at IS NULL
    )
    SELECT id FROM batch ORDER BY id DESC LIMIT 1
    """
)
# A build that failed (a lock timeout, a cancel) leaves its index in the catalog, INVALID: never
# used by a query, yet enough for IF NOT EXISTS to skip the build.
INVALID = sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")


def upgrade() -> None:
    migration = op.get_context()
    with migration.autocommit_block():
        if migration.as_sql:  # `--sql`: one UPDATE, nothing to batch by
            op.execute(
                "UPDATE tasks SET completed_at = updated_at"
                " WHERE status = 'COMPLETED' AND completed_at IS NULL"
            )
        else:
            after = uuid.UUID(int=0)
            while (
                last := op.get_bind().scalar(BACKFILL, {"after": after, "batch": BATCH})
            ) is not None:
                after = last  # each batch commits on its own
        lock_timeout = context.get_x_argument(as_dictionary=True).get("lock_timeout", LOCK_TIMEOUT)
        op.execute(
            sa.text("SELECT set_config('lock_timeout', :value, false)").bindparams(
                value=lock_timeout
            )
        )
        try:  # a session setting: it would stay on the connection, back in the app's pool
            if not migration.as_sql and op.get_bind().scalar(INVALID, {"name": INDEX}):
                op.drop_index(op.f(INDEX), table_name="tasks", postgresql_concurrently=True)
            op.create_index(
                op.f(INDEX),
                "tasks",
                ["completed_at"],
                postgresql_concurrently=True,
                if_not_exists=True,  # built by hand already (a DBA ahead of the deploy)
            )
        finally:
            op.execute("RESET lock_timeout")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            op.f(INDEX),
            table_name="tasks",
            postgresql_concurrently=True,
            if_exists=True,
        )
