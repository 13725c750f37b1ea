"""`Repository.stream`: rows in key order through a server-side cursor, closed on every way out
(the end, `break`, an error, a cancelled task), the connection back in the pool."""

from __future__ import annotations

import asyncio
import gc

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import QueuePool

from dblayer.models import Task, TaskStatus
from dblayer.repositories import TaskRepository, UserRepository
from dblayer.session import session_scope

ROWS = 2500


def checked_out(engine: AsyncEngine) -> int:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


@pytest.fixture
async def tasks(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with session_scope(sessionmaker) as session:
        ada = await UserRepository(session).create(
            email="ada@example.com", username="ada", hashed_password="x"
        )
        rows = [
            {"title": f"t{n}", "user_id": ada.id, "status": TaskStatus.COMPLETED}
            if n % 10 == 0
            else {"title": f"t{n}", "user_id": ada.id}
            for n in range(ROWS)
        ]
        await TaskRepository(session).bulk_create(rows)


@pytest.mark.usefixtures("tasks")
async def test_streams_every_row_in_key_order(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as session:
        async with TaskRepository(session).stream(batch=100) as rows:
            ids = [task.id async for task in rows]
        assert len(ids) == ROWS
        assert ids == sorted(ids)
        async with TaskRepository(session).stream(
            filters={"status": TaskStatus.COMPLETED}, where=[Task.title != "t0"]
        ) as rows:
            titles = [task.title async for task in rows]
        assert len(titles) == ROWS // 10 - 1


@pytest.mark.usefixtures("tasks")
async def test_break_closes_the_cursor(
    sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    """Under psycopg a server-side cursor not closed warns (ResourceWarning, an error in this
    suite) when it is collected; the block closes it."""
    async with sessionmaker() as session:
        async with TaskRepository(session).stream(batch=10) as rows:
            async for _ in rows:
                break
        gc.collect()
        assert checked_out(engine) == 1  # the session's, until it ends
        assert await TaskRepository(session).count() == ROWS  # the session goes on
    assert checked_out(engine) == 0


@pytest.mark.usefixtures("tasks")
async def test_an_error_or_a_cancelled_task_closes_it_and_returns_the_connection(
    sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> None:
    started = asyncio.Event()

    async def export() -> None:
        async with sessionmaker() as session, TaskRepository(session).stream(batch=10) as rows:
            async for _ in rows:
                started.set()
                await asyncio.sleep(0.001)

    running = asyncio.create_task(export())
    async with asyncio.timeout(30):
        await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    gc.collect()
    assert checked_out(engine) == 0

    with pytest.raises(RuntimeError, match="stop"):
        async with sessionmaker() as session, TaskRepository(session).stream() as rows:
            async for _ in rows:
                raise RuntimeError("stop")
    gc.collect()
    assert checked_out(engine) == 0
