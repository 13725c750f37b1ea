"""A generic async repository: the queries of one model, behind a small typed API.

A repository never commits: it adds, flushes and queries inside the caller's transaction (see
`dblayer.session.session_scope`), so a service can combine several calls into one unit of work.
What a client may sort and filter by is an allow-list on the class, page sizes are capped, and
every value a client sends travels as a bound parameter, never as SQL text.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import SecretStr, TypeAdapter, ValidationError
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncScalarResult, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from dblayer.models import Base, SoftDeleteMixin
from dblayer.repositories.copy import copy_rows
from dblayer.repositories.cursors import (
    InvalidCursorError,
    decode_cursor,
    default_cursor_secret,
    encode_cursor,
)

ModelT = TypeVar("ModelT", bound=Base)
UPSERT_ATTEMPTS = 3  # an upsert that collides on another unique index is tried this many times


class InvalidQueryError(ValueError):
    """A list request the repository refuses (unknown field, page too large, bad cursor).

    Raised before any SQL runs; the API answers it with 422."""


# --8<-- [start:page]
@dataclass(frozen=True)
class Page(Generic[ModelT]):
    """One page of rows. Pass `next_cursor` back as `cursor=` for the next; None on the last."""

    items: list[ModelT]
    next_cursor: str | None
    # --8<-- [end:page]


# --8<-- [start:upserted]
@dataclass(frozen=True)
class Upserted(Generic[ModelT]):
    """The rows of an upsert (in no particular order), and which of them were new."""

    items: list[ModelT]
    created: list[bool]  # per item: True where the row was inserted, False where it existed

    @property
    def inserted(self) -> int:
        return sum(self.created)

    @property
    def updated(self) -> int:
        return len(self.created) - self.inserted
        # --8<-- [end:upserted]


# --8<-- [start:repository]
class Repository(Generic[ModelT]):
    """CRUD, pagination and bulk operations for `model`. Subclasses set the allow-lists."""

    model: ClassVar[type[Base]]
    sortable: ClassVar[tuple[str, ...]] = ("created_at",)  # NOT NULL columns (keyset needs it)
    filterable: ClassVar[tuple[str, ...]] = ()
    default_sort: ClassVar[str] = "created_at"  # "-created_at" sorts newest first
    max_page_size: ClassVar[int] = 100
    copy_threshold: ClassVar[int] = 1000  # bulk_create switches to COPY from this many rows
    # The unique index an upsert is keyed on: its columns or expressions, and its predicate
    # when it is partial, word for word (PostgreSQL infers the index from them). None: no upsert.
    upsert_index: ClassVar[tuple[Any, ...] | None] = None
    upsert_where: ClassVar[ColumnElement[bool] | None] = None
    _by_id: ClassVar[Select[Any]]

    def __init__(self, session: AsyncSession, *, cursor_secret: SecretStr | None = None) -> None:
        """`cursor_secret` signs page cursors; by default `DB_CURSOR_SECRET` (see `_cursor_key`)."""
        self.session = session
        self._secret = cursor_secret

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a nullable sort column when the class is defined, not on a reader's request:
        keyset pagination compares (value, id) pairs, and NULL compares to nothing."""
        super().__init_subclass__(**kwargs)
        for name in cls.sortable:
            if _column(cls.model, name).nullable:
                raise TypeError(f"{cls.__name__}.sortable: {name!r} is nullable")
        # Built once: the hottest query skips statement construction and cache-key generation.
        cls._by_id = select(cls.model).where(_column(cls.model, "id") == bindparam("id"))
        # --8<-- [end:repository]

    # --8<-- [start:crud]
    async def get(self, id: uuid.UUID) -> ModelT | None:
        """The row with this primary key, or None (soft-deleted rows count as absent)."""
        found: ModelT | None = await self.session.scalar(self._by_id, {"id": id})
        return found

    async def create(self, **values: Any) -> ModelT:
        """Add a row and flush it, so database defaults and constraint errors arrive now."""
        obj: ModelT = self.model(**values)  # type: ignore[assignment]
        self.session.add(obj)
        await self.session.flush()
        return obj

    async def update(self, obj: ModelT, **values: Any) -> ModelT:
        """Set column attributes and flush (`updated_at` is set by the database)."""
        for name, value in values.items():
            _column(self.model, name)  # only mapped columns, by name
            setattr(obj, name, value)
        await self.session.flush()
        return obj

    async def delete(self, id: uuid.UUID) -> bool:
        """Delete (or soft-delete) the row; False when there was none."""
        obj = await self.get(id)
        if obj is None:
            return False
        if isinstance(obj, SoftDeleteMixin):
            obj.soft_delete()
        else:
            await self.session.delete(obj)
        await self.session.flush()
        return True
        # --8<-- [end:crud]

    async def count(
        self, filters: Mapping[str, object] | None = None, where: Sequence[ColumnElement[bool]] = ()
    ) -> int:
        """How many rows match (without loading them)."""
        statement = select(func.count()).select_from(self.model)
        statement = statement.where(*self._conditions(filters), *where)
        total = await self.session.scalar(statement)
        return int(total or 0)

    async def exists(self, id: uuid.UUID) -> bool:
        """Whether a (live) row with this key exists: one indexed lookup, nothing loaded."""
        found = await self.session.scalar(select(self._pk).where(self._pk == id).limit(1))
        return found is not None

    # --8<-- [start:get_multi]
    async def get_multi(
        self,
        *,
        filters: Mapping[str, object] | None = None,
        sort: str | None = None,
        limit: int = 50,
        offset: int = 0,
        cursor: str | None = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> Page[ModelT]:
        """A page of rows: `filters` and `sort` from the allow-lists, at most `max_page_size`.

        `sort` is a field name, `-name` for descending; ties are broken by the primary key, so
        the order is total. Page with `offset`, or better with `cursor` (keyset pagination):
        the next page starts after the last row seen, with an index range scan, and rows
        inserted meanwhile never shift a page. `where` is for conditions a subclass builds.
        """
        if not 1 <= limit <= self.max_page_size:
            raise InvalidQueryError(f"limit must be between 1 and {self.max_page_size}")
        if offset < 0 or (offset and cursor):
            raise InvalidQueryError("offset must be >= 0, and not combined with a cursor")
        sort = sort or self.default_sort
        descending = sort.startswith("-")
        field = sort.removeprefix("-")
        if field not in self.sortable:
            raise InvalidQueryError(
                f"cannot sort by {field!r}; allowed: {', '.join(self.sortable)}"
            )
        key = _column(self.model, field)
        pair = tuple_(key, self._pk)
        statement = self._select().where(*self._conditions(filters), *where)
        if cursor is not None:
            value, id = self._decode_cursor(cursor, sort, key)
            after = tuple_(literal(value, key.type), literal(id, self._pk.type))
            statement = statement.where(pair < after if descending else pair > after)
        order = (key.desc(), self._pk.desc()) if descending else (key.asc(), self._pk.asc())
        statement = statement.order_by(*order).offset(offset).limit(limit + 1)
        rows: list[ModelT] = list(await self.session.scalars(statement))
        items, more = rows[:limit], len(rows) > limit
        last = items[-1] if more else None
        next_cursor = None
        if last is not None:
            next_cursor = encode_cursor(
                self._cursor_key(), self.model.__name__, sort, *_values(last, field, "id")
            )
        return Page(items, next_cursor)
        # --8<-- [end:get_multi]

    # --8<-- [start:bulk]
    async def bulk_create(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Insert many rows in this transaction; returns how many. Python-side defaults (the
        UUIDv7 key) are filled in; from `copy_threshold` rows on, they go through COPY."""
        if not rows:
            return 0
        if len(rows) < self.copy_threshold:
            await self.session.execute(insert(self.model), list(rows))  # one multi-row INSERT
        else:
            await copy_rows(await self.session.connection(), self.model, rows)
        return len(rows)

    async def bulk_update(self, ids: Sequence[uuid.UUID], **values: Any) -> int:
        """Set the same values on many rows in one UPDATE; returns how many rows changed."""
        for name in values:
            _column(self.model, name)
        statement = update(self.model).where(self._pk.in_(ids), *self._live()).values(**values)
        # The default synchronize_session ("auto") also updates the objects this session holds,
        # so nothing read afterwards (a page's cursor, say) sees a stale value.
        result = await self.session.execute(statement)
        return cast("CursorResult[Any]", result).rowcount

    async def bulk_delete(self, ids: Sequence[uuid.UUID]) -> int:
        """Delete (or soft-delete) many rows in one statement; returns how many."""
        if issubclass(self.model, SoftDeleteMixin):
            return await self.bulk_update(ids, is_deleted=True, deleted_at=func.now())
        statement = delete(self.model).where(self._pk.in_(ids))
        result = await self.session.execute(statement)
        return cast("CursorResult[Any]", result).rowcount
        # --8<-- [end:bulk]

    # --8<-- [start:stream]
    @asynccontextmanager
    async def stream(
        self,
        *,
        filters: Mapping[str, object] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
        batch: int = 1000,
    ) -> AsyncIterator[AsyncScalarResult[ModelT]]:
        """Every matching row, in key order, fetched `batch` at a time through a server-side
        cursor, so memory holds one batch however many rows there are:
        `async with repo.stream() as rows: async for row in rows: ...`. The cursor is closed
        when the block ends, also by `break`, an error or a cancelled task (a psycopg cursor
        left open warns when collected). It lives in the caller's transaction."""
        statement = (
            self._select()
            .where(*self._conditions(filters), *where)
            .order_by(self._pk)
            .execution_options(yield_per=batch)
        )
        result = await self.session.stream_scalars(statement)
        try:
            yield result
        finally:
            await result.close()
        # --8<-- [end:stream]

    # --8<-- [start:upsert]
    async def upsert(
        self, rows: Sequence[Mapping[str, Any]], *, update: Collection[str]
    ) -> Upserted[ModelT]:
        """Insert the rows; where one conflicts on `upsert_index`, set its `update` columns from
        the row instead (`update=()`: leave it as it is, get-or-create). One statement,
        `INSERT … ON CONFLICT DO UPDATE … RETURNING`: concurrent calls for the same key never
        fail with a duplicate key, and every row comes back, as ORM objects refreshed from
        the database (`populate_existing`), with whether it was inserted (`xmax = 0`).

        The rows go in batches of up to 1000 in one statement each: two rows with the same key
        in a batch fail (SQLSTATE 21000). A row that conflicts on another unique index fails
        with an IntegrityError, after `UPSERT_ATTEMPTS` tries (see below), each in a savepoint:
        the caller's transaction goes on. Under REPEATABLE READ or SERIALIZABLE a retry meets a
        row its snapshot cannot see and fails with a serialization error (retry the whole
        unit of work then)."""
        if self.upsert_index is None:
            raise TypeError(f"{type(self).__name__} has no upsert_index")
        if not rows:
            return Upserted([], [])
        statement = pg_insert(self.model)
        set_: dict[str, Any] = {
            name: statement.excluded[_column(self.model, name).key] for name in update
        }
        if not set_:  # DO NOTHING would return no row for an existing key: a no-op update does
            set_ = {self._pk.key: self._pk}
        else:  # ON CONFLICT's SET ignores the columns' `onupdate` (updated_at): say it here
            set_.update(_on_update(self.model))
        statement = statement.on_conflict_do_update(
            index_elements=self.upsert_index, index_where=self.upsert_where, set_=set_
        )
        # Without `sort_by_parameter_order`: with it, SQLAlchemy sends one statement per row.
        returning = statement.returning(
            self.model,
            literal_column("xmax = 0", Boolean),  # inserted here, not updated
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.session.begin_nested():  # a failed attempt undoes only itself
                    result = await self.session.execute(
                        returning, list(rows), execution_options={"populate_existing": True}
                    )
                    pairs = result.all()
                items = cast("list[ModelT]", [pair[0] for pair in pairs])
                return Upserted(items, [pair[1] for pair in pairs])
            except IntegrityError as error:
                # ON CONFLICT arbitrates its own index only. A concurrent insert of the same key
                # can still collide on another unique index (the username), and PostgreSQL then
                # raises instead of updating; once that insert has committed, the conflict is
                # on the key, and the next attempt updates.
                if attempt == UPSERT_ATTEMPTS or getattr(error.orig, "sqlstate", "") != "23505":
                    raise
        # --8<-- [end:upsert]

    def _cursor_key(self) -> bytes:
        if self._secret is not None:
            return self._secret.get_secret_value().encode()
        return default_cursor_secret()

    def _decode_cursor(
        self, cursor: str, sort: str, key: InstrumentedAttribute[Any]
    ) -> tuple[Any, uuid.UUID]:
        validate = _adapter(key.type.python_type).validate_python
        try:
            return decode_cursor(self._cursor_key(), cursor, sort, self.model.__name__, validate)
        except InvalidCursorError as error:
            raise InvalidQueryError(str(error)) from None

    @property
    def _pk(self) -> InstrumentedAttribute[Any]:
        return _column(self.model, "id")  # every model has the UUIDv7 key of the mixin

    def _select(self) -> Select[ModelT]:
        return select(self.model)

    def _live(self) -> list[ColumnElement[bool]]:
        """UPDATE and DELETE are not filtered by the soft-delete hook (only SELECTs are)."""
        if issubclass(self.model, SoftDeleteMixin):
            return [~_column(self.model, "is_deleted")]  # the partial indexes' own words
        return []

    def _conditions(self, filters: Mapping[str, object] | None) -> list[ColumnElement[bool]]:
        """`field == value` for allow-listed fields, each value checked against its type."""
        conditions = []
        for name, value in (filters or {}).items():
            if name not in self.filterable:
                raise InvalidQueryError(
                    f"cannot filter by {name!r}; allowed: {', '.join(self.filterable) or 'none'}"
                )
            column = _column(self.model, name)
            try:
                checked = _adapter(column.type.python_type).validate_python(value)
            except ValidationError:
                raise InvalidQueryError(f"invalid value for {name!r}") from None
            conditions.append(column == checked)
        return conditions


def _column(model: type[Base], name: str) -> InstrumentedAttribute[Any]:
    """The mapped column attribute `name` of `model`; ValueError for anything else."""
    attribute = model.__mapper__.column_attrs.get(name)
    if attribute is None:
        raise ValueError(f"{model.__name__} has no column {name!r}")
    column: InstrumentedAttribute[Any] = getattr(model, name)
    return column


def _on_update(model: type[Base]) -> dict[str, Any]:
    """The SQL expressions the model's columns set on every UPDATE (`updated_at = now()`)."""
    table: Table = model.__table__  # type: ignore[assignment]
    return {
        column.name: column.onupdate.arg  # type: ignore[attr-defined]
        for column in table.columns
        if column.onupdate is not None and column.onupdate.is_clause_element
    }


def _values(obj: Base, *names: str) -> list[Any]:
    return [getattr(obj, name) for name in names]


@cache
def _adapter(python_type: Any) -> TypeAdapter[Any]:
    return TypeAdapter(python_type)
