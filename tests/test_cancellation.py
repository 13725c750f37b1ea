"""A task cancelled while its statement runs on the server (docs/pooling-failures.md).

asyncio cancels once: the driver cancels the statement on the server, and SQLAlchemy closes the
connection. anyio's cancel scopes (`move_on_after`, `fail_after`, a task group's cancel) cancel
every await inside them again, the driver's own clean-up included: asyncpg's cancel request (a
task of its own) is dropped, psycopg's try is cancelled too over TCP with libpq 17+ (over a Unix
socket it races anyio's second cancel). The connection is closed, and the server runs the
statement on, its row locks held, until it ends. `DB_CLIENT_CONNECTION_CHECK_INTERVAL` makes
the server notice the closed connection and stop. Each driver has its own cancel path: a complete
run runs every test under both."""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
import psycopg
import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from dblayer.engine import create_engine
from dblayer.pool import pool_status
from dblayer.settings import Driver, get_settings

# Each driver cancels (or fails to) in its own way: `make test FULL=1` runs each test under both;
# the quick loop runs each under one, which covers both across the tests.
pytestmark = pytest.mark.usefixtures("client_check")  # off by default, and may be turned on

SLOW = text("SELECT pg_sleep(30)")
STILL_RUNNING = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND state = 'active' AND query = 'SELECT pg_sleep(30)'"
)
ORPHANS_ENDED = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND query = 'SELECT pg_sleep(30)'"
)
LOCK_THE_ROW = text("SELECT id FROM held WHERE id = 1 FOR UPDATE")


async def _engines(database_url: URL, **settings: object) -> tuple[AsyncEngine, AsyncEngine]:
    url = _as_given(database_url)
    app = create_engine(get_settings(database_url=url, **settings))
    other = create_engine(get_settings(database_url=url))
    async with other.begin() as conn:
        await conn.execute(text("CREATE TABLE held (id int PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO held VALUES (1)"))
    return app, other


async def _slow_work_holding_the_row(engine: AsyncEngine, locked: anyio.Event) -> None:
    async with engine.begin() as conn:
        await conn.execute(LOCK_THE_ROW)
        locked.set()
        await conn.execute(SLOW)


async def _until_the_slow_statement(observer: AsyncEngine, *, runs: bool, seconds: float) -> None:
    """Until the server shows the slow statement running (or no longer). Once stopped, the
    server's process rolls back (the row is free), then exits, and only then leaves
    pg_stat_activity: a look taken just after the row came free may still see it (CI's PG14 stage
    did)."""
    with anyio.fail_after(seconds):
        while True:
            async with observer.connect() as conn:  # a new transaction: a new snapshot
                if bool(await conn.scalar(STILL_RUNNING)) is runs:
                    return
            await anyio.sleep(0.02)


async def _cancel_with_anyio(engine: AsyncEngine, observer: AsyncEngine, how: str) -> None:
    """A timeout around the work (`move_on_after`), or the cancel a request handler meets when
    its task group is cancelled."""
    if how == "move_on_after":
        with anyio.move_on_after(1):
            await _slow_work_holding_the_row(engine, anyio.Event())
        return
    async with anyio.create_task_group() as group:
        locked = anyio.Event()
        group.start_soon(_slow_work_holding_the_row, engine, locked)
        await locked.wait()
        await _until_the_slow_statement(observer, runs=True, seconds=10)
        group.cancel_scope.cancel()


async def _lock_wait(engine: AsyncEngine, seconds: float) -> float:
    """Seconds until another connection got the row; raises 55P03 after `seconds`."""
    started = time.monotonic()
    async with engine.begin() as conn:
        await conn.execute(text(f"SET LOCAL lock_timeout = '{seconds}s'"))
        await conn.execute(LOCK_THE_ROW)
    return time.monotonic() - started


HOWS = ["move_on_after", "task_group"]


def _over_a_unix_socket(url: URL) -> bool:
    host = str(url.query.get("host") or url.host or "")
    return not host or host.startswith("/")


@pytest.mark.parametrize("how", HOWS)
async def test_cancelled_by_anyio_the_statement_runs_on_holding_its_lock(
    database_url: URL, driver: Driver, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    if driver == "psycopg" and _over_a_unix_socket(database_url):
        pytest.skip("psycopg's cancel over a Unix socket may get out: its orphan is shown over TCP")
    if driver == "psycopg" and psycopg.pq.version() < 170000:
        pytest.skip("libpq < 17: psycopg cancels from a thread, which anyio does not cancel")
    app, other = await _engines(database_url)
    try:
        with caplog.at_level(logging.WARNING, logger="psycopg"):
            await _cancel_with_anyio(app, other, how)
        if driver == "psycopg":  # what a reader sees in the log
            assert "query cancellation interrupted (CancelledError): closing connection" in (
                caplog.text
            )
        assert pool_status(app).checked_out == 0  # the pool lost nothing: the connection is gone
        async with other.connect() as conn:
            assert await conn.scalar(STILL_RUNNING) == 1  # but the server runs the statement on
        with pytest.raises(DBAPIError) as raised:
            await _lock_wait(other, 1)
        assert getattr(raised.value.orig, "sqlstate", None) == "55P03"  # the row is still locked
    finally:
        async with other.connect() as conn:  # end the orphan rather than wait 30 s for it
            await conn.execute(ORPHANS_ENDED)
        await app.dispose()
        await other.dispose()


@pytest.mark.parametrize("how", HOWS)
async def test_with_the_check_interval_the_server_stops_it_and_frees_the_row(
    database_url: URL, how: str
) -> None:
    app, other = await _engines(database_url, db_client_connection_check_interval=0.25)
    try:
        async with app.connect() as conn:
            assert await conn.scalar(text("SHOW client_connection_check_interval")) == "250ms"
        await _cancel_with_anyio(app, other, how)
        assert await _lock_wait(other, 10) < 5  # within a few checks, not the statement's 30 s
        await _until_the_slow_statement(other, runs=False, seconds=5)
    finally:
        await app.dispose()
        await other.dispose()


async def test_cancelled_by_asyncio_the_driver_cancels_the_statement(database_url: URL) -> None:
    """The contrast: asyncio's single cancel lets the driver cancel the statement on the server
    (SQLAlchemy then closes the connection), without the setting."""
    app, other = await _engines(database_url)
    try:
        locked = anyio.Event()
        task = asyncio.create_task(_slow_work_holding_the_row(app, locked))
        await locked.wait()
        await _until_the_slow_statement(other, runs=True, seconds=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await _lock_wait(other, 5) < 3  # at once: a cancel request, not the 30 s
        assert pool_status(app).checked_out == 0
    finally:
        await app.dispose()
        await other.dispose()


async def test_over_a_unix_socket_asyncpg_leaves_the_statement_running_too(
    database_url: URL, driver: Driver
) -> None:
    """asyncpg's cancel task is dropped whatever the connection. (psycopg's cancel over a Unix
    socket races anyio's second cancel: seen to get out, and seen not to; nothing to assert.)
    Needs the server's socket on this machine (the embedded server's)."""
    if driver == "psycopg":
        pytest.skip("psycopg's cancel over a Unix socket races anyio's: it gets out, or not")
    engine = create_engine(get_settings(database_url=_as_given(database_url)))
    async with engine.connect() as conn:
        directory = str(await conn.scalar(text("SHOW unix_socket_directories"))).split(",")[0]
    await engine.dispose()
    if not await anyio.Path(f"{directory}/.s.PGSQL.{database_url.port or 5432}").exists():
        pytest.skip("the server's Unix socket is not on this machine")
    app, other = await _engines(database_url.set(host="", query={"host": directory}))
    try:
        await _cancel_with_anyio(app, other, "move_on_after")
        async with other.connect() as conn:
            assert await conn.scalar(STILL_RUNNING) == 1
    finally:
        async with other.connect() as conn:
            await conn.execute(ORPHANS_ENDED)
        await app.dispose()
        await other.dispose()


def _as_given(url: URL) -> str:
    return url.render_as_string(hide_password=False)
