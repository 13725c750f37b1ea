"""jobs: a queue workers take from with FOR UPDATE SKIP LOCKED

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 03:41:48+00:00

A new table and its type: nothing existing is locked or rewritten, so no `lock_timeout` and no
`autocommit_block()` (compare 0002, 0003). The partial index holds only queued jobs: what the
workers' `SELECT … FOR UPDATE SKIP LOCKED` looks for (`dblayer.jobs`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "status",
            sa.Enum("QUEUED", "DONE", "FAILED", name="job_status"),
            server_default="QUEUED",
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column(
            "run_after", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(
        "ix_jobs_queued",
        "jobs",
        ["queue", "id"],
        unique=False,
        postgresql_where="status = 'QUEUED'",
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queued", table_name="jobs", postgresql_where="status = 'QUEUED'")
    op.drop_table("jobs")
    # Dropping the table leaves its enum type behind (the next upgrade would fail on it).
    sa.Enum(name="job_status").drop(op.get_bind())
