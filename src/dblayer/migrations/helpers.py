"""Steps that revisions on busy tables share: each takes its locks briefly, or gives up."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

LOCK_TIMEOUT = "5s"  # as in revisions 0002 and 0003; they read `-x lock_timeout=…` and pass it


# --8<-- [start:set_not_null]
def set_not_null(
    migration: MigrationContext, table: str, column: str, *, lock_timeout: str = LOCK_TIMEOUT
) -> None:
    """`ALTER COLUMN … SET NOT NULL` without reading the table under ACCESS EXCLUSIVE.

    A plain SET NOT NULL reads every row while holding ACCESS EXCLUSIVE: no reads, no writes
    meanwhile. Instead, each step in a transaction of its own (`autocommit_block()`), each
    waiting at most `lock_timeout` for its lock, then failing (55P03) rather than queueing every
    query of the app behind it:

    1. a `CHECK (column IS NOT NULL) NOT VALID`: ACCESS EXCLUSIVE for a moment, no rows read;
    2. `VALIDATE CONSTRAINT` reads the rows under SHARE UPDATE EXCLUSIVE: reads and writes go on;
    3. `SET NOT NULL`: ACCESS EXCLUSIVE again, but the validated check proves there is no NULL
       (PostgreSQL 12+), so no row is read;
    4. the check is dropped: the column's NOT NULL does its job.

    A NULL left by the backfill makes step 2 fail (23514), leaving the check NOT VALID (it
    already refuses new NULLs). Safe to run again after any failure: step 1 starts over.
    """
    op = Operations(migration)
    quote = migration.impl.dialect.identifier_preparer.quote
    name, col, check = quote(table), quote(column), quote(f"ck_{table}_{column}_not_null")
    with migration.autocommit_block():
        op.execute(
            sa.text("SELECT set_config('lock_timeout', :value, false)").bindparams(
                value=lock_timeout
            )
        )
        try:  # a session setting: reset, since the connection may go back to the app's pool
            op.execute(f"ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {check}")
            op.execute(
                f"ALTER TABLE {name} ADD CONSTRAINT {check} CHECK ({col} IS NOT NULL) NOT VALID"
            )
            op.execute(f"ALTER TABLE {name} VALIDATE CONSTRAINT {check}")
            op.execute(f"ALTER TABLE {name} ALTER COLUMN {col} SET NOT NULL")
            op.execute(f"ALTER TABLE {name} DROP CONSTRAINT {check}")
        finally:
            op.execute("RESET lock_timeout")
            # --8<-- [end:set_not_null]
