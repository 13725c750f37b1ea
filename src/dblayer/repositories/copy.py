"""`COPY … FROM STDIN` for many rows, on the session's own connection and transaction, under
either driver, with errors raised as SQLAlchemy raises them for any other statement."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from sqlalchemy import Column, Table, select
from sqlalchemy.exc import (
    DatabaseError,
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from dblayer.models import Base


# --8<-- [start:copy]
async def copy_rows(
    connection: AsyncConnection, model: type[Base], rows: Sequence[Mapping[str, Any]]
) -> None:
    """COPY the rows into the model's table, on the session's connection and transaction.

    Columns are those the rows name plus those with a Python-side default (filled in here, as
    the ORM would); each value goes through the column type's bind processor (enum -> name).
    """
    table: Table = model.__table__  # type: ignore[assignment]
    names = set().union(*rows)
    unknown = names - set(table.columns.keys())
    if unknown:
        raise ValueError(f"{model.__name__} has no column(s) {sorted(unknown)}")
    columns = [c for c in table.columns if c.key in names or c.default is not None]
    dialect = connection.dialect
    cells = [_cell(column, column.type.bind_processor(dialect)) for column in columns]
    records = [tuple(cell(row) for cell in cells) for row in rows]
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    if dialect.driver == "asyncpg":
        if not driver.is_in_transaction():
            # asyncpg has no implicit transaction: SQLAlchemy sends BEGIN with its first statement.
            # Let it, so the COPY belongs to the caller's transaction and rolls back with it.
            await connection.execute(select(1))
        try:
            await driver.copy_records_to_table(
                table.name,
                records=records,
                columns=[c.name for c in columns],
                schema_name=table.schema,
            )
        except Exception as error:
            _raise_as_sqlalchemy_error(error, f"COPY {table.name}")
        return
    from psycopg import sql

    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(*filter(None, [table.schema, table.name])),
        sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
    )
    try:
        async with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for values in records:
                await copy.write_row(values)
    except Exception as error:
        _raise_as_sqlalchemy_error(error, f"COPY {table.name}")
    # --8<-- [end:copy]


# SQLSTATE class -> the exception SQLAlchemy raises for it on any other statement.
_ERRORS_BY_CLASS: dict[str, type[DBAPIError]] = {
    "22": DataError,  # a value does not fit (too long, out of range, bad text)
    "23": IntegrityError,  # unique, foreign key, check, not null
    "40": OperationalError,  # serialization failure, deadlock
    "42": ProgrammingError,  # a missing table or column
}


def _raise_as_sqlalchemy_error(error: Exception, statement: str) -> NoReturn:
    """The driver's error as SQLAlchemy raises it for every other statement (`IntegrityError`
    for a duplicate key, the driver's error as `.orig`, its SQLSTATE as `.orig.sqlstate`).
    COPY runs on the driver's own connection, so nothing wrapped it, and a caller catching
    `IntegrityError` would have missed it. Classified by SQLSTATE, the same for both drivers;
    an error without one (not from the server) is raised as it is."""
    sqlstate = getattr(error, "sqlstate", None)
    if not isinstance(sqlstate, str):
        raise error
    kind = _ERRORS_BY_CLASS.get(sqlstate[:2], DatabaseError)
    raise kind(statement, None, error, hide_parameters=True) from error


def _cell(
    column: Column[Any], process: Callable[[Any], Any] | None
) -> Callable[[Mapping[str, Any]], Any]:
    """How to get this column's value out of a row: the row's own value, else the default (a
    constant converted once, or a function such as uuid7 called per row), then converted."""
    key, default = column.key, column.default
    factory: Callable[[Any], Any] | None = None
    constant: Any = None
    if default is not None and default.is_callable:
        factory = default.arg  # type: ignore[attr-defined]
    elif default is not None:
        constant = default.arg  # type: ignore[attr-defined]
        constant = process(constant) if process else constant
    convert = process or (lambda value: value)

    def cell(row: Mapping[str, Any]) -> Any:
        if key in row:
            return convert(row[key])
        return convert(factory(None)) if factory else constant

    return cell
