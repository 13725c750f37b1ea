"""Columns most tables want: a time-ordered UUID key, timestamps, and soft delete.

Soft-deleted rows are hidden from ORM SELECTs by a session-wide filter (`do_orm_execute`), unless
the query opts in with `.execution_options(include_deleted=True)`. ORM bulk UPDATE and DELETE
statements are not filtered.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast
from weakref import WeakKeyDictionary

from sqlalchemy import Executable, Table, event, false, func
from sqlalchemy.orm import (
    Mapped,
    Mapper,
    ORMExecuteState,
    RelationshipProperty,
    Session,
    mapped_column,
    with_loader_criteria,
)
from sqlalchemy.sql import visitors
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


# Built once: making the option (its lambda is analysed) on every query was part of the cost.
_HIDE_DELETED = with_loader_criteria(
    # `NOT is_deleted`, word for word the partial unique indexes' predicate, so PostgreSQL can
    # use them (it does not see that `is_deleted IS false` implies it).
    SoftDeleteMixin,
    lambda cls: ~cls.is_deleted,
    include_aliases=True,
)
# statement -> its rewritten copy, or None when it touches no soft-delete model. Weak keys: an
# entry lives as long as the statement, so a prebuilt one is looked at once, not per execution.
_REWRITTEN: WeakKeyDictionary[Executable, Executable | None] = WeakKeyDictionary()
# A statement built anew per call is looked at once per shape: by its cache key, which
# SQLAlchemy computes for the execution anyway (and keeps on the statement).
_INVOLVES: dict[Any, bool] = {}
_INVOLVES_MAX = 1000  # shapes remembered; then forgotten all at once and relearned


@event.listens_for(Session, "do_orm_execute")
def _hide_deleted(state: ORMExecuteState) -> None:
    """Add `is_deleted = false` to ORM SELECTs that involve a soft-delete model, also where it is
    joined or loaded through a relationship. Any other SELECT runs untouched, so a prebuilt
    statement keeps its memoized cache key. ORM bulk UPDATE and DELETE are not SELECTs: they are
    not filtered (say `.where(~Model.is_deleted)`)."""
    if (
        not state.is_select
        or state.is_column_load
        or state.execution_options.get("include_deleted", False)
    ):
        return
    statement = state.statement
    try:
        rewritten = _REWRITTEN[statement]
    except KeyError:
        rewritten = statement.options(_HIDE_DELETED) if _involves(statement) else None
        _REWRITTEN[statement] = rewritten
    if rewritten is not None:
        state.statement = rewritten
        # --8<-- [end:soft_delete]


def _involves(statement: Executable) -> bool:
    """`_involves_soft_delete`, remembered per cache key: equal keys mean the same SQL."""
    cache_key = statement._generate_cache_key()  # type: ignore[attr-defined]
    if cache_key is None:  # a statement SQLAlchemy does not cache: look at it every time
        return _involves_soft_delete(statement)
    involves = _INVOLVES.get(cache_key.key)
    if involves is None:
        if len(_INVOLVES) >= _INVOLVES_MAX:
            _INVOLVES.clear()
        involves = _INVOLVES[cache_key.key] = _involves_soft_delete(statement)
    return involves


def _involves_soft_delete(statement: Executable) -> bool:
    """Whether a soft-delete model appears anywhere in the statement (FROM, joins, subqueries,
    EXISTS from a relationship's `has()`/`any()`, its table named directly), is joined through a
    relationship, or could be by a loader option (then yes: the joined eager load is added at
    compile time, and an option's path is not looked into)."""
    tables = _guarded_tables()
    for element in visitors.iterate(cast("visitors.ExternallyTraversible", statement)):
        if getattr(element, "_with_options", ()):
            return True
        if isinstance(element, Table) and element in tables:
            return True
        entity = getattr(element, "_annotations", {}).get("parententity")
        if entity is not None and _guarded(entity.mapper):
            return True
        for target, *_ in getattr(element, "_setup_joins", ()):
            relationship = getattr(target, "property", None)
            if isinstance(relationship, RelationshipProperty) and _guarded(relationship.mapper):
                return True
    return False


def _guarded_tables() -> set[Table]:
    """The tables of every mapped soft-delete model (read when a new statement shape is seen, so
    models defined later count too)."""
    found: set[Table] = set()
    pending: list[type] = [SoftDeleteMixin]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        table = getattr(cls, "__table__", None)
        if isinstance(table, Table):
            found.add(table)
    return found


def _guarded(mapper: Mapper[Any], seen: frozenset[Mapper[Any]] = frozenset()) -> bool:
    """A soft-delete model, or one whose rows bring one along by a `lazy="joined"` relationship."""
    if issubclass(mapper.class_, SoftDeleteMixin):
        return True
    return any(
        relationship.lazy == "joined"
        and relationship.mapper not in seen
        and _guarded(relationship.mapper, seen | {mapper})
        for relationship in mapper.relationships
    )
