"""Revision 0002 under the conditions of a busy production table: other transactions holding locks
while it runs, a lock timeout, a retry, and the app's own pool afterwards. Under both drivers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from dblayer.engine import create_engine
from dblayer.migrate import current_revision, downgrade_to, head_revision, upgrade_to_head
from dblayer.settings import get_settings
from dblayer.testing import connect

QUICK = ("lock_timeout=200ms",)  # `-x lock_timeout=…`: the tests need not wait the shipped 5 s
INDEX_IS_VALID = text(
    "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_tasks_completed_at')"
)
NULLS_LEFT = text("SELECT count(*) FROM tasks WHERE status = 'COMPLETED' AND completed_at IS NULL")
WAITING_FOR_A_LOCK = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def _tasks_at_0001(engine: AsyncEngine, tasks: int = 2500) -> None:
    """The schema before 0002, with more tasks than one batch, half of them completed."""
    await downgrade_to(engine, "0001")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (id, email, username, hashed_password)"
                " VALUES ('00000000-0000-0000-0000-000000000001', 'a@x.org', 'a', 'x')"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO tasks (id, title, user_id, status)"
                " SELECT gen_random_uuid(), 't' || n, '00000000-0000-0000-0000-000000000001',"
                " CASE WHEN n % 2 = 0 THEN 'COMPLETED'::task_status ELSE 'PENDING' END"
                " FROM generate_series(1, :tasks) AS n"
            ),
            {"tasks": tasks},
        )


async def _waiting_for_a_lock(engine: AsyncEngine) -> bool:
    # A transaction of its own each time: pg_stat_activity is a snapshot taken once per transaction.
    async with engine.connect() as conn:
        return bool(await conn.scalar(WAITING_FOR_A_LOCK))


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


async def test_0002_backfills_in_batches_and_indexes_concurrently(engine: AsyncEngine) -> None:
    await _tasks_at_0001(engine)  # more rows than one batch, half of them completed
    await upgrade_to_head(engine)
    async with engine.connect() as conn:
        counts = (
            await conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE completed_at IS NOT NULL),"
                    " count(*) FILTER (WHERE status = 'COMPLETED') FROM tasks"
                )
            )
        ).one()
        index = await conn.scalar(text("SELECT to_regclass('ix_tasks_completed_at')"))
    assert tuple(counts) == (1250, 1250)
    assert index == "ix_tasks_completed_at"


async def test_a_retry_after_a_lock_timeout_rebuilds_the_invalid_index(engine: AsyncEngine) -> None:
    """CREATE INDEX CONCURRENTLY enters the index in the catalog, then waits for the transactions
    writing to the table; a lock timeout there leaves the index INVALID (present, never used)."""
    await _tasks_at_0001(engine, tasks=10)
    async with engine.connect() as writer:  # an open transaction that writes to tasks
        await writer.execute(text("LOCK TABLE tasks IN ROW EXCLUSIVE MODE"))
        with pytest.raises(DBAPIError) as caught:
            await upgrade_to_head(engine, x_arguments=QUICK)
        assert _sqlstate(caught.value) == "55P03"  # lock_not_available: the lock timeout
        await writer.commit()
    async with engine.connect() as conn:
        assert await conn.scalar(INDEX_IS_VALID) is False  # what the failed build left
    await upgrade_to_head(engine, x_arguments=QUICK)  # the retry, nothing in its way now
    assert await current_revision(engine) == head_revision()
    async with engine.connect() as conn:
        assert await conn.scalar(INDEX_IS_VALID) is True


async def test_the_backfill_waits_for_rows_another_transaction_holds(engine: AsyncEngine) -> None:
    """Rows locked by the app while the backfill runs are backfilled once they are released."""
    await _tasks_at_0001(engine)
    async with engine.connect() as holder:
        await holder.execute(
            text(
                "SELECT id FROM tasks WHERE status = 'COMPLETED' AND completed_at IS NULL"
                " ORDER BY title LIMIT 20 FOR UPDATE"
            )
        )
        upgrade = asyncio.create_task(upgrade_to_head(engine))
        # Release the rows once the upgrade waits for them (or has finished without them).
        while not await _waiting_for_a_lock(engine):
            finished, _ = await asyncio.wait({upgrade}, timeout=0.05)
            if finished:
                break
        await holder.commit()
    await upgrade
    async with engine.connect() as conn:
        assert await conn.scalar(NULLS_LEFT) == 0


@pytest.fixture
async def one_connection(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An app engine whose pool holds a single connection: every checkout gets the same one."""
    settings = get_settings(
        database_url=database_url.render_as_string(hide_password=False),
        db_pool_size=1,
        db_max_overflow=0,
    )
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


async def _lock_timeout(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str(await conn.scalar(text("SHOW lock_timeout")))


async def test_the_lock_timeout_goes_with_the_upgrade(
    one_connection: AsyncEngine, database_url: URL
) -> None:
    """The app's pool gets its connection back with the server's lock_timeout, success or not."""
    engine = one_connection
    default = await _lock_timeout(engine)
    await _tasks_at_0001(engine, tasks=10)
    await upgrade_to_head(engine, x_arguments=QUICK)
    assert await _lock_timeout(engine) == default

    await downgrade_to(engine, "0001")
    with connect(database_url.set(drivername="postgresql")) as writer, writer.transaction():
        writer.execute("LOCK TABLE tasks IN ROW EXCLUSIVE MODE")
        with pytest.raises(DBAPIError) as caught:
            await upgrade_to_head(engine, x_arguments=QUICK)
    assert _sqlstate(caught.value) == "55P03"
    assert await _lock_timeout(engine) == default
