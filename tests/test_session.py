"""`session_scope`: all or nothing, and a session never shared between tasks."""

from __future__ import annotations

import asyncio
import warnings

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import InvalidRequestError, SAWarning
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import Task, User
from dblayer.session import session_scope


def user(name: str) -> User:
    return User(email=f"{name}@example.com", username=name, hashed_password="x")


async def users(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(User)) or 0)


async def test_the_factory_keeps_objects_readable_after_commit(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    assert sessionmaker.kw["expire_on_commit"] is False
    assert sessionmaker.kw["autoflush"] is True
    async with session_scope(sessionmaker) as session:
        ada = user("ada")
        session.add(ada)
    assert ada.username == "ada"  # no reload needed, none attempted
    assert ada.created_at is not None


async def test_a_scope_commits_on_success(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with session_scope(sessionmaker) as session:
        session.add_all([user("ada"), user("bob")])
    assert await users(sessionmaker) == 2


async def test_an_error_rolls_back_everything(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    ada = user("ada")
    with pytest.raises(RuntimeError, match="after the first write"):
        async with session_scope(sessionmaker) as session:
            session.add(ada)
            await session.flush()  # the INSERT ran; the transaction is still open
            session.add(Task(title="half", user_id=ada.id))
            await session.flush()
            raise RuntimeError("after the first write")
    assert await users(sessionmaker) == 0
    async with sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Task)) == 0


async def test_cancellation_rolls_back(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    started = asyncio.Event()

    async def slow_write() -> None:
        async with session_scope(sessionmaker) as session:
            session.add(user("ada"))
            await session.flush()
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(slow_write())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await users(sessionmaker) == 0


async def test_autoflush_lets_a_query_see_what_was_just_added(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        session.add(user("ada"))
        found = await session.scalar(select(User).where(User.username == "ada"))
        assert found is not None


async def test_one_session_per_task(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    """Sharing one session between concurrent tasks fails (and writes nothing); a session per
    task works."""

    async def add(session: AsyncSession, name: str) -> None:
        session.add(user(name))
        await session.flush()

    with (
        pytest.warns(SAWarning, match=r"Session.add\(\)"),
        pytest.raises(InvalidRequestError, match="Session is already flushing"),
    ):
        async with session_scope(sessionmaker) as session:
            await session.execute(select(1))
            results = await asyncio.gather(
                *(add(session, f"u{i}") for i in range(3)), return_exceptions=True
            )
            assert [type(r).__name__ for r in results] == ["NoneType", *["InvalidRequestError"] * 2]
            raise next(r for r in results if isinstance(r, Exception))
    assert await users(sessionmaker) == 0

    async def own_session(name: str) -> None:
        async with session_scope(sessionmaker) as session:
            await add(session, name)

    await asyncio.gather(*(own_session(f"u{i}") for i in range(5)))
    assert await users(sessionmaker) == 5


async def test_a_scope_runs_at_the_isolation_level_it_is_given(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """The level is set before anything else runs in the transaction (later, SQLAlchemy would
    ignore it with only a warning); the connection goes back to the pool at the default."""
    show = text("SHOW transaction_isolation")
    for level in ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "execution_options ignored" would fail the test
            async with session_scope(sessionmaker, isolation_level=level) as session:
                assert await session.scalar(show) == level.lower()
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(show) == "read committed"
