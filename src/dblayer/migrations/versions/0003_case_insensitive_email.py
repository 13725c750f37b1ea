"""one email whatever its case: live users' emails are unique by lower(email)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 20:30:00+00:00

Until now only `UserService` lower-cased emails; the repository's `create` and `bulk_create`
(and any SQL) could store `Ada@x.org` beside `ada@x.org`. The schema now decides.

Without blocking the table: the new index is built `CONCURRENTLY` under a temporary name
(reads and writes go on; PostgreSQL refuses that inside a transaction, hence
`autocommit_block()`), the old one is dropped `CONCURRENTLY`, and the new one takes its name,
so errors and code that name the index are unchanged. Uniqueness by exact email holds until the
new index is in place.

Each step waits at most `lock_timeout` (5s, or `-x lock_timeout=…`) behind other transactions,
then gives up; the setting is reset whatever happens. If live rows already differ only in case,
the build fails: the half-built (INVALID) index is dropped and the upgrade stops with what to
do, leaving the database at 0002. A retry after a failure of any kind first drops an INVALID
index left behind, instead of skipping it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "uq_users_email_live"
LOCK_TIMEOUT = "5s"  # as in 0002: `alembic -x lock_timeout=30s upgrade head` for another value
FIND_SHARED = (
    "SELECT lower(email), count(*) FROM users WHERE NOT is_deleted GROUP BY 1 HAVING count(*) > 1"
)
REFUSED = (
    "emails shared by live users whose addresses differ only in case; merge or soft-delete "
    f"them, then upgrade again. Find them with: {FIND_SHARED}"
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if op.get_context().as_sql:  # `--sql`: the same refusal, in the script a DBA runs
            op.execute(
                f"DO $$ BEGIN IF EXISTS ({FIND_SHARED}) THEN "
                f"RAISE EXCEPTION '{REFUSED.replace(chr(39), chr(39) * 2)}'; END IF; END $$"
            )
        _set_lock_timeout()
        try:
            _replace("lower", sa.text("lower(email)"), leftover="exact")
        except sa.exc.IntegrityError:
            _drop_if_invalid(f"{NAME}_lower")
            raise CommandError(REFUSED) from None
        finally:  # a session setting: it would stay on the connection, back in the app's pool
            op.execute("RESET lock_timeout")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _set_lock_timeout()
        try:  # exact-case uniqueness always holds where lower(email)'s did
            _replace("exact", "email", leftover="lower")
        finally:
            op.execute("RESET lock_timeout")


def _set_lock_timeout() -> None:
    """Give up rather than wait behind a long transaction (the deploy fails fast, a retry
    finishes the job); outside a transaction, so a session setting, reset by the caller."""
    value = context.get_x_argument(as_dictionary=True).get("lock_timeout", LOCK_TIMEOUT)
    op.execute(sa.text("SELECT set_config('lock_timeout', :value, false)").bindparams(value=value))


def _replace(kind: str, expression: sa.TextClause | str, *, leftover: str) -> None:
    """Build the new index beside the old one, drop the old, give the new the old's name.
    Safe to rerun after a failure at any step; a half-done run the other way is cleared."""
    building = f"{NAME}_{kind}"
    op.drop_index(
        f"{NAME}_{leftover}", table_name="users", postgresql_concurrently=True, if_exists=True
    )
    _drop_if_invalid(building)
    op.create_index(
        building,
        "users",
        [expression],
        unique=True,
        postgresql_where="NOT is_deleted",
        postgresql_concurrently=True,
        if_not_exists=True,
    )
    op.drop_index(NAME, table_name="users", postgresql_concurrently=True, if_exists=True)
    op.execute(f"ALTER INDEX {building} RENAME TO {NAME}")


def _drop_if_invalid(name: str) -> None:
    """A failed CONCURRENTLY build leaves an INVALID index, which IF NOT EXISTS would keep."""
    if op.get_context().as_sql:
        return
    invalid = op.get_bind().scalar(
        sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
        {"name": name},
    )
    if invalid:
        op.drop_index(name, table_name="users", postgresql_concurrently=True)
