"""COPY fails the way every other statement fails: with SQLAlchemy's exception for the error.

`bulk_create` switches to COPY from `copy_threshold` rows on, and COPY runs on the driver's own
connection, outside SQLAlchemy's error handling; without wrapping, a caller catching
`IntegrityError` around `bulk_create` would catch it for 999 rows and miss it for 1000.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.repositories import UserRepository
from dblayer.session import session_scope

pytestmark = pytest.mark.both_drivers  # each driver's COPY has its own error path


class CopyingUsers(UserRepository):
    copy_threshold: ClassVar[int] = 1  # every bulk_create goes through COPY


def _user(username: Any, email: str = "ada@example.org") -> dict[str, Any]:
    return {"email": email, "username": username, "hashed_password": "x"}


@pytest.mark.parametrize(
    ("rows", "error", "sqlstate"),
    [
        ([_user("ada"), _user("ada", "other@example.org")], IntegrityError, "23505"),
        ([_user("a" * 51)], DataError, "22001"),
    ],
    ids=["duplicate-key", "too-long"],
)
async def test_copy_raises_sqlalchemys_error_with_the_sqlstate(
    sessionmaker: async_sessionmaker[AsyncSession],
    rows: list[dict[str, Any]],
    error: type[Exception],
    sqlstate: str,
) -> None:
    with pytest.raises(error) as raised:
        async with session_scope(sessionmaker) as session:
            await CopyingUsers(session).bulk_create(rows)
    assert isinstance(raised.value, IntegrityError | DataError)
    assert raised.value.orig is not None
    assert getattr(raised.value.orig, "sqlstate", None) == sqlstate
    assert raised.value.__cause__ is raised.value.orig  # the driver's error, chained
    assert "[parameters" not in str(raised.value)  # no bound values (emails) in the message


async def test_an_error_that_is_not_the_servers_is_raised_as_it_is(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """A value the driver cannot send never reaches the server: no SQLSTATE, nothing to map
    (asyncpg raises TypeError, psycopg its ProgrammingError "cannot adapt type")."""
    with pytest.raises(Exception, match=r"(?i)adapt|expected str") as raised:
        async with session_scope(sessionmaker) as session:
            await CopyingUsers(session).bulk_create([_user(object())])
    assert not isinstance(raised.value, DBAPIError)
