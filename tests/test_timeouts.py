"""Timeouts the server enforces, under both drivers: a statement that runs too long is cancelled
(DB_STATEMENT_TIMEOUT, 57014), one that waits too long for a lock too (DB_LOCK_TIMEOUT, 55P03), a
transaction left idle is ended (DB_IDLE_IN_TRANSACTION_TIMEOUT); the API answers 503 with
Retry-After, and the pool serves the next request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError

from dblayer.api import create_app
from dblayer.api.deps import SessionDep
from dblayer.engine import connect_args, create_engine
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import APP_TIMEOUTS, SettingsError, get_settings
from tests.apps import client_for, settings_for
from tests.paths import ROOT


async def test_a_slow_statement_is_cancelled_and_the_pool_goes_on(database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    engine = create_engine(get_settings(database_url=url, db_statement_timeout=0.2))
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SHOW statement_timeout")) == "200ms"
            with pytest.raises(DBAPIError) as raised:
                await conn.execute(text("SELECT pg_sleep(2)"))
            assert getattr(raised.value.orig, "sqlstate", None) == "57014"  # query_canceled
        async with engine.connect() as conn:  # the same pool, the same server connection
            assert await conn.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


def test_each_setting_reaches_the_server_in_milliseconds_under_either_driver() -> None:
    settings = get_settings(
        db_statement_timeout=30,
        db_idle_in_transaction_timeout=60,
        db_lock_timeout=0.5,
        db_client_connection_check_interval=0.25,
    )
    expected = {
        "statement_timeout": "30000",
        "idle_in_transaction_session_timeout": "60000",
        "lock_timeout": "500",
        "client_connection_check_interval": "250",
    }
    assert connect_args(settings)["server_settings"] == expected
    options = connect_args(settings.model_copy(update={"database_driver": "psycopg"}))["options"]
    assert options == " ".join(f"-c {name}={value}" for name, value in expected.items())


async def test_the_server_applies_them_to_every_connection(database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    settings = get_settings(
        database_url=url, db_idle_in_transaction_timeout=60, db_lock_timeout=0.25
    )
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SHOW idle_in_transaction_session_timeout")) == "1min"
            assert await conn.scalar(text("SHOW lock_timeout")) == "250ms"
    finally:
        await engine.dispose()


def test_without_the_setting_the_server_s_own_applies() -> None:
    for driver in ("asyncpg", "psycopg"):
        args = connect_args(get_settings(database_driver=driver))
        assert "server_settings" not in args
        assert "options" not in args


@pytest.mark.parametrize("value", [0, -1, "soon"])
@pytest.mark.parametrize("name", [*APP_TIMEOUTS, "db_client_connection_check_interval"])
def test_a_timeout_that_is_not_one_is_one_line(name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=rf"^{name.upper()}: [^\n]+$"):
        get_settings(**{name: value})


async def test_a_write_behind_ddl_fails_fast_instead_of_queueing(database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    engine = create_engine(get_settings(database_url=url, db_lock_timeout=0.2))
    try:
        async with engine.connect() as migration:  # a migration's DDL, its transaction open
            await migration.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            with pytest.raises(DBAPIError) as raised:
                async with engine.begin() as conn:
                    await conn.execute(text("UPDATE tasks SET title = title"))
            assert getattr(raised.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
            assert "canceling statement due to lock timeout" in str(raised.value.orig)
            await migration.commit()
        async with engine.begin() as conn:  # the lock released, the same write goes through
            await conn.execute(text("UPDATE tasks SET title = title"))
    finally:
        await engine.dispose()


async def test_a_forgotten_transaction_is_ended_and_the_next_unit_of_work_succeeds(
    database_url: URL, driver: str
) -> None:
    """The server closes the session: psycopg reads its 25P03, asyncpg finds the connection
    closed. Either way SQLAlchemy invalidates the connection, so the pool (one connection,
    pre-ping off: not what recovers here) opens a new one for the next unit of work."""
    url = database_url.render_as_string(hide_password=False)
    settings = get_settings(
        database_url=url,
        db_idle_in_transaction_timeout=0.2,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_pre_ping=False,
    )
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    try:
        with pytest.raises(DBAPIError) as raised:
            async with session_scope(sessionmaker) as session:
                pid = await session.scalar(text("SELECT pg_backend_pid()"))
                await asyncio.sleep(1)  # e.g. an HTTP call made inside the transaction
        assert raised.value.connection_invalidated
        if driver == "psycopg":
            assert getattr(raised.value.orig, "sqlstate", None) == "25P03"
            assert "idle-in-transaction timeout" in str(raised.value.orig)
        else:
            assert "the underlying connection is closed" in str(raised.value.orig)
        async with session_scope(sessionmaker) as session:
            assert await session.scalar(text("SELECT pg_backend_pid()")) != pid
    finally:
        await engine.dispose()


async def test_the_api_answers_503_with_retry_after_then_serves_the_next_request(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(database_url).model_copy(update={"db_statement_timeout": 0.2}))

    @app.get("/slow")
    async def slow(session: SessionDep) -> dict[str, int]:
        await session.execute(text("SELECT pg_sleep(2)"))
        return {"done": 1}  # pragma: no cover - cancelled before

    async for client in client_for(app):
        response = await client.get("/slow")
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert response.json() == {"detail": "the database is unavailable, try again shortly"}
        assert (await client.get("/tasks")).status_code == 200  # the pool serves the next one
    assert "503 for GET /slow: a statement ran past DB_STATEMENT_TIMEOUT" in caplog.text


async def test_a_write_that_waits_past_the_lock_timeout_is_503(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(database_url, db_lock_timeout=0.2))
    async for client in client_for(app):
        engine = app.state.engine
        async with engine.connect() as migration:
            await migration.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            response = await client.get("/tasks")
            await migration.commit()
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert (await client.get("/tasks")).status_code == 200
    assert "503 for GET /tasks: a lock was not free in time (DB_LOCK_TIMEOUT" in caplog.text


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("40001", "a serialization failure (40001) rolled the transaction back"),
        ("40P01", "a deadlock (40P01) rolled the transaction back"),
    ],
)
async def test_a_conflict_that_reaches_the_api_is_503(
    database_url: URL, caplog: pytest.LogCaptureFixture, code: str, reason: str
) -> None:
    app = create_app(settings_for(database_url))

    @app.get("/conflict")
    async def conflict(session: SessionDep) -> dict[str, int]:
        # The server's own error with that SQLSTATE, as a real conflict raises it.
        await session.execute(
            text(f"DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{code}'; END $$")
        )
        return {"done": 1}  # pragma: no cover - raised before

    async for client in client_for(app):
        response = await client.get("/conflict")
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert response.json() == {"detail": "the database is unavailable, try again shortly"}
    assert f"503 for GET /conflict: {reason}" in caplog.text


async def test_a_request_whose_transaction_sat_idle_too_long_is_503_and_the_next_is_served(
    database_url: URL, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    app = create_app(settings_for(database_url, db_idle_in_transaction_timeout=0.2))

    @app.get("/idle")
    async def idle(session: SessionDep) -> dict[str, int]:
        await session.execute(text("SELECT 1"))
        await asyncio.sleep(0.6)  # e.g. an HTTP call made inside the transaction
        return {"done": 1}

    async for client in client_for(app):
        response = await client.get("/idle")
        assert response.status_code == 503, response.text
        assert (await client.get("/tasks")).status_code == 200
    assert "503 for GET /idle: " in caplog.text
    if driver == "psycopg":  # asyncpg finds the connection closed, without the server's error
        assert "sat idle past DB_IDLE_IN_TRANSACTION_TIMEOUT; the server ended it" in caplog.text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3000000, "Input should be less than or equal to 2147483.647"),  # the server's INT_MAX ms
        ("inf", "Input should be a finite number"),
        ("-inf", "Input should be a finite number"),
        ("nan", "Input should be a finite number"),
    ],
)
@pytest.mark.parametrize("name", [*APP_TIMEOUTS, "db_client_connection_check_interval"])
def test_a_timeout_beyond_what_the_server_takes_is_one_line(
    name: str, value: Any, message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        get_settings(**{name: value})
    assert str(caught.value) == f"{name.upper()}: {message}"


def test_the_largest_timeout_the_server_takes_is_accepted() -> None:
    settings = get_settings(db_statement_timeout=2147483.647)
    assert connect_args(settings)["server_settings"] == {"statement_timeout": "2147483647"}


def test_alembic_migrates_without_the_apps_timeouts(
    monkeypatch: pytest.MonkeyPatch, database_url: URL
) -> None:
    """The `alembic` command (migrations/env.py) connects with `for_migrations()`: a statement
    timeout far too short for any migration is the app's alone."""
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    for name in ("DB_STATEMENT_TIMEOUT", "DB_LOCK_TIMEOUT", "DB_IDLE_IN_TRANSACTION_TIMEOUT"):
        monkeypatch.setenv(name, "0.001")
    ini = Config(str(ROOT / "alembic.ini"))
    command.downgrade(ini, "base")
    command.upgrade(ini, "head")
