"""Columns most tables want: a time-ordered UUID key, timestamps, and soft delete.

Soft-deleted rows are hidden from every ORM query by a session-wide filter (`do_orm_execute`),
unless the query opts in with `.execution_options(include_deleted=True)`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import event, false, func
from sqlalchemy.orm import Mapped, ORMExecuteState, Session, mapped_column, with_loader_criteria
from uuid_utils.compat import uuid7


# --8<-- [start:uuid]
class UUIDPrimaryKeyMixin:
    """A UUIDv7 primary key made in Python: time-ordered (index-friendly, sorts by creation) and
    known before the INSERT, so many rows can go in one statement."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7, sort_order=-10)
    # --8<-- [end:uuid]


# --8<-- [start:timestamps]
class TimestampMixin:
    """`created_at` and `updated_at`, set by the server's clock (one clock for every client).

    `eager_defaults` fetches them with RETURNING during the flush, so they are readable after
    an INSERT or UPDATE without another query (which async code could not do implicitly).
    """

    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), sort_order=10)
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), onupdate=func.now(), sort_order=10
    )
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 - SQLAlchemy reads a plain dict
    # --8<-- [end:timestamps]


# --8<-- [start:soft_delete]
class SoftDeleteMixin:
    """Rows are marked deleted, not removed; ORM queries stop seeing them (see `_hide_deleted`)."""

    is_deleted: Mapped[bool] = mapped_column(default=False, server_default=false(), sort_order=20)
    deleted_at: Mapped[datetime | None] = mapped_column(sort_order=20)

    def soft_delete(self) -> None:
        self.is_deleted = True
        self.deleted_at = datetime.now(UTC)

    def restore(self) -> None:
        self.is_deleted = False
        self.deleted_at = None


@event.listens_for(Session, "do_orm_execute")
def _hide_deleted(state: ORMExecuteState) -> None:
    """Add `is_deleted = false` to every ORM SELECT (relationship loads included)."""
    if (
        state.is_select
        and not state.is_column_load
        and not state.execution_options.get("include_deleted", False)
    ):
        state.statement = state.statement.options(
            with_loader_criteria(
                SoftDeleteMixin,
                lambda cls: cls.is_deleted.is_(False),
                include_aliases=True,
            )
        )
        # --8<-- [end:soft_delete]
