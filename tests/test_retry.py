"""`run_in_transaction` re-runs the whole unit of work after a real deadlock (40P01) or a real
serialization failure (40001), under both drivers, and nothing else: a unique or check violation
is raised at once, and after the last attempt the last error is raised as it is."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import Task, User
from dblayer.retry import is_retryable, run_in_transaction, sqlstate
from dblayer.session import IsolationLevel, session_scope

Maker = async_sessionmaker[AsyncSession]
T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[None]]


async def retried(
    sessionmaker: Maker,
    work: Callable[[AsyncSession], Awaitable[T]],
    attempts: int = 5,
    isolation_level: IsolationLevel | None = None,
) -> T:
    """`run_in_transaction` with short waits, to keep the tests quick."""
    return await run_in_transaction(
        sessionmaker,
        work,
        attempts=attempts,
        backoff=0.01,
        max_backoff=0.05,
        isolation_level=isolation_level,
    )


def raise_sqlstate(code: str) -> str:
    """A statement the server fails with this SQLSTATE, as it would for the real cause."""
    return f"DO $$ BEGIN RAISE EXCEPTION 'raised here' USING ERRCODE = '{code}'; END $$"


async def _users(sessionmaker: Maker, *names: str) -> list[uuid.UUID]:
    async with session_scope(sessionmaker) as session:
        users = [User(email=f"{n}@example.com", username=n, hashed_password="x") for n in names]
        session.add_all(users)
    return [user.id for user in users]


async def test_a_deadlock_victim_is_run_again_and_both_commit(
    sessionmaker: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = await _users(sessionmaker, "ada", "bob")
    locked = {first: asyncio.Event(), second: asyncio.Event()}
    runs: list[str] = []

    def rename_both(one: uuid.UUID, other: uuid.UUID, name: str) -> Work:
        async def work(session: AsyncSession) -> None:
            runs.append(name)
            update = text("UPDATE users SET full_name = :name WHERE id = :id")
            await session.execute(update, {"name": name, "id": one})
            locked[one].set()
            await locked[other].wait()  # each holds one row and then wants the other's
            await session.execute(update, {"name": name, "id": other})

        return work

    await asyncio.gather(
        retried(sessionmaker, rename_both(first, second, "first")),
        retried(sessionmaker, rename_both(second, first, "second")),
    )
    assert sorted(runs) in (["first", "first", "second"], ["first", "second", "second"])
    async with session_scope(sessionmaker) as session:
        names = set(await session.scalars(select(User.full_name)))
    assert len(names) == 1  # both rows renamed by the same, last, transaction
    assert "unit of work rolled back (40P01 deadlock detected), attempt 1 of 5" in caplog.text


async def test_a_serialization_failure_is_run_again_on_fresh_reads(sessionmaker: Maker) -> None:
    (user,) = await _users(sessionmaker, "ada")
    counted = [asyncio.Event(), asyncio.Event()]
    first_done = asyncio.Event()
    runs = 0

    def add_numbered(me: int) -> Work:
        async def work(session: AsyncSession) -> None:
            nonlocal runs
            runs += 1
            count = select(func.count()).select_from(Task).where(Task.user_id == user)
            number = await session.scalar(count) or 0
            counted[me].set()
            await counted[1 - me].wait()  # both have read before either writes
            session.add(Task(title=f"task {number + 1}", user_id=user))
            await session.flush()
            if me == 1:
                await first_done.wait()  # commits second: the one the server fails

        return work

    async def first() -> None:
        await retried(sessionmaker, add_numbered(0), isolation_level="SERIALIZABLE")
        first_done.set()

    second = retried(sessionmaker, add_numbered(1), isolation_level="SERIALIZABLE")
    await asyncio.gather(first(), second)
    assert runs == 3
    async with session_scope(sessionmaker) as session:
        titles = sorted(await session.scalars(select(Task.title)))
    assert titles == ["task 1", "task 2"]  # the re-run read the first one's task


async def test_the_whole_unit_is_run_again_from_scratch(sessionmaker: Maker) -> None:
    """The first attempt's insert is rolled back with it; each attempt has a new session."""
    sessions: list[AsyncSession] = []

    async def work(session: AsyncSession) -> int:
        sessions.append(session)
        await _add_user(session, f"try{len(sessions)}")
        if len(sessions) == 1:
            await session.execute(text(raise_sqlstate("40001")))
        return len(sessions)

    assert await retried(sessionmaker, work) == 2
    assert sessions[0] is not sessions[1]
    async with session_scope(sessionmaker) as session:
        assert list(await session.scalars(select(User.username))) == ["try2"]


async def _add_user(session: AsyncSession, name: str) -> None:
    session.add(User(email=f"{name}@example.com", username=name, hashed_password="x"))
    await session.flush()


async def test_it_gives_up_after_the_last_attempt_with_the_last_error(
    sessionmaker: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    async def always_conflicts(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        await session.execute(text(raise_sqlstate("40P01")))

    with pytest.raises(DBAPIError) as raised:
        await retried(sessionmaker, always_conflicts, attempts=3)
    assert runs == 3
    assert sqlstate(raised.value) == "40P01"
    assert caplog.text.count("unit of work rolled back (40P01 raised here)") == 2  # not the last
    assert "attempt 2 of 3" in caplog.text


@pytest.mark.parametrize(
    ("code", "statements"),
    [
        (
            "23505",
            [
                "INSERT INTO users (id, email, username, hashed_password) VALUES "
                "(gen_random_uuid(), 'other@example.com', 'ada', 'x')"
            ],
        ),  # unique violation
        ("23514", ["CREATE TEMP TABLE t (n int CHECK (n > 0))", "INSERT INTO t VALUES (-1)"]),
        ("22012", ["SELECT 1 / 0"]),  # division by zero: a bug, not a conflict
        # a statement timeout: run again, it would take as long
        ("57014", ["SET LOCAL statement_timeout = 50", "SELECT pg_sleep(1)"]),
    ],
)
async def test_other_errors_are_raised_at_once(
    sessionmaker: Maker, code: str, statements: list[str]
) -> None:
    await _users(sessionmaker, "ada")
    runs = 0

    async def work(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        for statement in statements:
            await session.execute(text(statement))

    with pytest.raises(DBAPIError) as raised:
        await retried(sessionmaker, work)
    assert sqlstate(raised.value) == code
    assert runs == 1


async def test_what_is_not_a_database_error_is_not_retried(sessionmaker: Maker) -> None:
    async def work(session: AsyncSession) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await run_in_transaction(sessionmaker, work)
    assert not is_retryable(KeyError("a bug"))
    assert sqlstate(KeyError("a bug")) is None


async def test_at_least_one_attempt(sessionmaker: Maker) -> None:
    async def work(session: AsyncSession) -> None:  # pragma: no cover - never run
        pass

    with pytest.raises(ValueError, match="attempts must be 1 or more"):
        await run_in_transaction(sessionmaker, work, attempts=0)


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
async def test_each_attempt_runs_at_the_isolation_level_asked_for(
    sessionmaker: Maker, level: IsolationLevel
) -> None:
    """Set before the transaction's first statement (as `session_scope` does), on every attempt,
    the re-run included; the connection goes back to the pool at the default."""
    levels: list[str | None] = []

    async def work(session: AsyncSession) -> None:
        levels.append(await session.scalar(text("SHOW transaction_isolation")))
        if len(levels) == 1:
            await session.execute(text(raise_sqlstate("40001")))

    await retried(sessionmaker, work, isolation_level=level)
    assert levels == [level.lower()] * 2
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(text("SHOW transaction_isolation")) == "read committed"
