"""Business rules under concurrency: two requests on separate sessions, raced for many rounds.

Each rule that reads a row, checks it and writes it back must hold when another transaction
changes the row between the read and the write. Every round starts a fresh pair of sessions
at once; the assertions hold for every round, whatever the interleaving was.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import Task, TaskStatus
from dblayer.repositories import UserRepository
from dblayer.services import InvalidStateError, TaskService
from dblayer.session import session_scope

ROUNDS = 25

Action = Callable[[TaskService, uuid.UUID], Awaitable[Task]]


async def _new_task(
    sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> uuid.UUID:
    async with session_scope(sessionmaker) as session:
        task = await TaskService(session).create(user_id=user_id, title="raced")
        return task.id


async def _user(sessionmaker: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    async with session_scope(sessionmaker) as session:
        user = await UserRepository(session).create(
            email="race@example.com", username="race", hashed_password="x"
        )
        return user.id


async def _race(
    sessionmaker: async_sessionmaker[AsyncSession], task_id: uuid.UUID, *actions: Action
) -> list[Task | BaseException]:
    """Run each action in its own session and transaction, all at once."""

    async def run(action: Action) -> Task:
        async with session_scope(sessionmaker) as session:
            return await action(TaskService(session), task_id)

    return await asyncio.gather(*(run(a) for a in actions), return_exceptions=True)


async def _stored(sessionmaker: async_sessionmaker[AsyncSession], task_id: uuid.UUID) -> Task:
    async with session_scope(sessionmaker) as session:
        return (await session.scalars(select(Task).where(Task.id == task_id))).one()


def _complete(service: TaskService, task_id: uuid.UUID) -> Awaitable[Task]:
    return service.mark_completed(task_id)


def _cancel(service: TaskService, task_id: uuid.UUID) -> Awaitable[Task]:
    return service.cancel(task_id)


async def test_complete_and_cancel_at_once_exactly_one_wins(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """The lost update: both read PENDING; without a row lock both succeed and the row ends
    CANCELLED with `completed_at` set, a state the rules forbid."""
    user_id = await _user(sessionmaker)
    winners: set[str] = set()
    for _ in range(ROUNDS):
        task_id = await _new_task(sessionmaker, user_id)
        completed, cancelled = await _race(sessionmaker, task_id, _complete, _cancel)
        outcomes = [r for r in (completed, cancelled) if not isinstance(r, InvalidStateError)]
        assert len(outcomes) == 1, f"both succeeded: {completed!r}, {cancelled!r}"
        for result in (completed, cancelled):
            if isinstance(result, BaseException) and not isinstance(result, InvalidStateError):
                raise result
        stored = await _stored(sessionmaker, task_id)
        if stored.status is TaskStatus.COMPLETED:
            assert stored.completed_at is not None
            winners.add("complete")
        else:
            assert stored.status is TaskStatus.CANCELLED
            assert stored.completed_at is None, "a cancelled task has a completion time"
            winners.add("cancel")
    assert winners, "no round finished"


async def test_completing_twice_at_once_reports_one_completion_time(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """A retried request racing the original: both answer with the time that was stored."""
    user_id = await _user(sessionmaker)
    for _ in range(ROUNDS):
        task_id = await _new_task(sessionmaker, user_id)
        results = await _race(sessionmaker, task_id, _complete, _complete)
        times: list[datetime | None] = []
        for result in results:
            assert isinstance(result, Task), result
            times.append(result.completed_at)
        stored = await _stored(sessionmaker, task_id)
        assert times == [stored.completed_at] * 2, "a caller was told a time that was replaced"


async def _wait_for_a_lock_wait(sessionmaker: async_sessionmaker[AsyncSession]) -> str:
    """The query of the first backend seen waiting for a lock (polled, for at most 30 s)."""
    for _ in range(300):
        async with sessionmaker() as session:  # a new transaction: a new statistics snapshot
            query = await session.scalar(
                text(
                    "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND state = 'active' AND datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
            )
        if query is not None:
            return str(query)
        await asyncio.sleep(0.1)
    raise AssertionError("no request ever waited for the row lock")


@pytest.mark.parametrize("second", [_complete, _cancel], ids=["then-complete", "then-cancel"])
async def test_an_action_waits_for_a_concurrent_change_and_sees_it(
    sessionmaker: async_sessionmaker[AsyncSession], second: Action
) -> None:
    """Deterministic interleaving: a transaction has cancelled the task but not committed yet;
    a second request on another session must wait at its read (not only at its write) and then
    act on what was committed, not on the PENDING it could still have read."""
    user_id = await _user(sessionmaker)
    task_id = await _new_task(sessionmaker, user_id)
    async with session_scope(sessionmaker) as first:
        await TaskService(first).cancel(task_id)
        await first.flush()  # the row is changed and locked; not committed
        pending = asyncio.create_task(_race(sessionmaker, task_id, second))
        waiting = await _wait_for_a_lock_wait(sessionmaker)
        assert waiting.rstrip().endswith("FOR NO KEY UPDATE"), waiting
        assert not pending.done()
    [result] = await pending
    stored = await _stored(sessionmaker, task_id)
    assert stored.status is TaskStatus.CANCELLED
    assert stored.completed_at is None
    if second is _complete:
        assert isinstance(result, InvalidStateError), result
    else:
        assert isinstance(result, Task)
        assert result.status is TaskStatus.CANCELLED


async def test_a_stale_object_in_the_session_is_reread_before_the_check(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """The session already holds the task as PENDING; another request cancels and commits.
    Without `populate_existing` the locked read would return the held object unchanged, and a
    cancelled task would be completed."""
    user_id = await _user(sessionmaker)
    task_id = await _new_task(sessionmaker, user_id)
    async with session_scope(sessionmaker) as session:
        held = await TaskService(session).get(task_id)  # held: the identity map keeps it
        assert held.status is TaskStatus.PENDING
        await _race(sessionmaker, task_id, _cancel)
        with pytest.raises(InvalidStateError):
            await TaskService(session).mark_completed(task_id)
        assert held.status.value == "cancelled"  # refreshed by the locked read
    stored = await _stored(sessionmaker, task_id)
    assert stored.status is TaskStatus.CANCELLED
    assert stored.completed_at is None
