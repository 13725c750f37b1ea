"""Which failures mean "the database is unavailable" (503), decided where they happen: on connect.

Only a failure to connect is classified as unavailable; any other `OSError` (a file a route
cannot read) is a bug or an outage of something else, and stays a 500 with its traceback.
"""

from __future__ import annotations

import pytest
from sqlalchemy import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from dblayer.api import create_app
from dblayer.engine import DatabaseUnavailableError, check_connection, create_engine
from dblayer.settings import get_settings
from tests.apps import client_for


def broken(url: URL, how: str, silent_port: int) -> URL:
    """`url` (a database that exists) with one part changed so that connecting fails."""
    if how == "refused":
        return url.set(port=1)
    if how == "silent":
        return url.set(port=silent_port)
    if how == "password":
        return url.set(password="hunter2")
    return url.set(database="no_such_database")


CAUSES = {
    "refused": "connection refused; is the server running on that port?",
    "silent": "timed out; is the host reachable and the port open?",
    "password": "password authentication failed for user 'postgres'",
    "database": "database 'no_such_database' does not exist",
}


async def test_what_sqlalchemy_alone_raises_on_a_refused_connect(database_url: URL) -> None:
    """Why the engine classifies: without it, asyncpg's failure is a bare OSError (SQLAlchemy
    wraps only the driver's own errors), psycopg's an OperationalError."""
    engine = create_async_engine(database_url.set(port=1))
    try:
        with pytest.raises((OSError, OperationalError)) as caught:
            async with engine.connect():
                pass  # pragma: no cover - never reached
    finally:
        await engine.dispose()
    expected = ConnectionRefusedError if engine.dialect.driver == "asyncpg" else OperationalError
    assert type(caught.value) is expected


async def test_check_connection_classifies_for_any_engine(database_url: URL) -> None:
    """An engine not made by `create_engine` (no classifying listener) still gets one error."""
    engine = create_async_engine(database_url.set(port=1))
    try:
        with pytest.raises(DatabaseUnavailableError, match="connection refused"):
            await check_connection(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("how", list(CAUSES))
async def test_a_failed_connect_is_database_unavailable_under_both_drivers(
    database_url: URL, silent_port: int, how: str, request: pytest.FixtureRequest
) -> None:
    """Any query's first connect, not only `check_connection`: the engine classifies it, so the
    two drivers' different exceptions (asyncpg's raw OSError, psycopg's OperationalError) end
    as one error, with the same message."""
    if how == "password":
        request.getfixturevalue("password_auth")  # skipped where any password is accepted
    url = broken(database_url, how, silent_port)
    engine = create_engine(
        get_settings(database_url=url.render_as_string(hide_password=False), db_connect_timeout=1)
    )
    try:
        with pytest.raises(DatabaseUnavailableError) as caught:
            async with engine.connect():
                pass  # pragma: no cover - never reached
    finally:
        await engine.dispose()
    assert str(caught.value).endswith(CAUSES[how])
    assert caught.value.transient is (how in {"refused", "silent"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("how", list(CAUSES))
async def test_a_failed_connect_is_503_under_both_drivers(
    database_url: URL,
    silent_port: int,
    how: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if how == "password":
        request.getfixturevalue("password_auth")  # skipped where any password is accepted
    url = broken(database_url, how, silent_port)
    app = create_app(
        get_settings(database_url=url.render_as_string(hide_password=False), db_connect_timeout=1)
    )
    async for client in client_for(app):
        response = await client.get("/tasks")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json() == {"detail": "the database is unavailable, try again shortly"}
    assert "503 for GET /tasks: cannot connect to 127.0.0.1:" in caplog.text
    assert CAUSES[how] in caplog.text
    assert "hunter2" not in caplog.text
    assert "Traceback" not in caplog.text
