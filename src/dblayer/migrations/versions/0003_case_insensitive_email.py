"""one email whatever its case: the unique index on live users' emails compares lower(email)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 20:30:00+00:00

Until now only `UserService` lower-cased emails; the repository's `create` and `bulk_create`
(and any SQL) could store `Ada@x.org` beside `ada@x.org`. The schema now decides.

Live rows that already differ only in case would make the new index fail with a bare
"could not create unique index": the revision counts them first and stops with what to do,
changing nothing (the transaction is rolled back). Writes to `users` wait while it runs (a
SHARE ROW EXCLUSIVE lock, taken first so no new duplicate slips in between the check and the
index); reads wait only for the instant of the index swap. `lock_timeout` makes it give up
rather than queue behind a long transaction; it is `SET LOCAL`, so it ends with the migration.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIND_SHARED = (
    "SELECT lower(email), count(*) FROM users WHERE NOT is_deleted GROUP BY 1 HAVING count(*) > 1"
)
COUNT_SHARED = sa.text(
    "SELECT count(*) FROM (SELECT 1 FROM users WHERE NOT is_deleted"
    " GROUP BY lower(email) HAVING count(*) > 1) AS shared"
)


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
    if not op.get_context().as_sql:
        shared = op.get_bind().scalar(COUNT_SHARED)
        if shared:
            raise CommandError(
                f"{shared} email(s) are shared by live users whose addresses differ only in "
                "case; merge or soft-delete them first, then upgrade again. "
                f"Find them with: {FIND_SHARED}"
            )
    _replace_email_index(sa.text("lower(email)"))


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    _replace_email_index("email")


def _replace_email_index(expression: sa.TextClause | str) -> None:
    op.drop_index("uq_users_email_live", table_name="users", postgresql_where="NOT is_deleted")
    op.create_index(
        "uq_users_email_live",
        "users",
        [expression],
        unique=True,
        postgresql_where="NOT is_deleted",
    )
