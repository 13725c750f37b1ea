"""A job queue in a PostgreSQL table, taken from with `SELECT … FOR UPDATE SKIP LOCKED`.

One transaction per job: a worker locks the oldest queued job, runs the handler on the same
session, and stores the outcome; the three commit together. Other workers pass over the locked
row instead of waiting for it, so each job has one worker at a time. A worker that dies on the
way (its task cancelled, its connection cut, its process killed) never commits: the transaction
is rolled back, the row is queued and unlocked again, and the next worker takes it. Keep jobs
short (seconds): the row stays locked, and a connection checked out, for as long as one runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import Job, JobStatus
from dblayer.session import session_scope

Handler = Callable[[AsyncSession, Job], Awaitable[None]]
RETRY_DELAY = timedelta(seconds=10)  # before the second attempt; doubled before each next one


# --8<-- [start:enqueue]
async def enqueue(
    session: AsyncSession, queue: str, payload: dict[str, Any], *, max_attempts: int = 3
) -> Job:
    """Add a job in the caller's transaction: it exists for workers when that commits, and
    not at all if it rolls back (no job for an order that was never saved)."""
    job = Job(queue=queue, payload=payload, max_attempts=max_attempts)
    session.add(job)
    await session.flush()  # its id, from the sequence
    return job
    # --8<-- [end:enqueue]


# --8<-- [start:claim]
async def claim(session: AsyncSession, queue: str) -> Job | None:
    """Lock the oldest job of `queue` that is due, skipping jobs other workers hold, and count
    the attempt. The row stays locked until this transaction ends."""
    job = await session.scalar(
        select(Job)
        .where(Job.queue == queue, Job.status == JobStatus.QUEUED, Job.run_after <= func.now())
        .order_by(Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)  # the row as it is now, not as last seen
    )
    if job is not None:
        job.attempts += 1  # rolled back with the rest if this worker dies
    return job
    # --8<-- [end:claim]


# --8<-- [start:outcome]
def complete(job: Job) -> None:
    """The job is done: committed with the handler's writes."""
    job.status = JobStatus.DONE
    job.last_error = None


async def fail(job: Job, error: Exception, *, retry_delay: timedelta = RETRY_DELAY) -> None:
    """Record the error; queue the job again after a delay that doubles with each attempt, or
    mark it FAILED once it has had `max_attempts`."""
    attempts = await job.awaitable_attrs.attempts  # reloaded if the handler's rollback expired it
    job.last_error = f"{type(error).__name__}: {error}"
    if attempts >= job.max_attempts:
        job.status = JobStatus.FAILED
    else:  # the server's clock, which `claim` compares with
        job.run_after = func.now() + retry_delay * 2 ** (attempts - 1)
        # --8<-- [end:outcome]


# --8<-- [start:run_one]
async def run_one(
    sessionmaker: async_sessionmaker[AsyncSession],
    queue: str,
    handler: Handler,
    *,
    retry_delay: timedelta = RETRY_DELAY,
) -> Job | None:
    """Claim one job, run `handler(session, job)` and store the outcome, in one transaction;
    None when no job is due. The handler runs in a savepoint: when it raises, its writes are
    undone and the failure is stored. Anything else that ends the transaction early (a
    cancellation, a lost connection) rolls the claim back too: the job is queued again."""
    async with session_scope(sessionmaker) as session:
        job = await claim(session, queue)
        if job is None:
            return None
        try:
            async with session.begin_nested():
                await handler(session, job)
        except Exception as error:  # not CancelledError: a cancelled worker gives the job back
            if isinstance(error, DBAPIError) and error.connection_invalidated:
                raise  # the connection is gone, and the claim with it: nothing to store
            await fail(job, error, retry_delay=retry_delay)
        else:
            complete(job)
    return job
    # --8<-- [end:run_one]


# --8<-- [start:work]
async def work(
    sessionmaker: async_sessionmaker[AsyncSession],
    queue: str,
    handler: Handler,
    *,
    stop: asyncio.Event,
    idle: float = 1.0,
    retry_delay: timedelta = RETRY_DELAY,
) -> int:
    """A worker: run jobs one after the other until `stop` is set, and return how many ran.
    When none is due, wait `idle` seconds (or until `stop`) outside any transaction, then look
    again. Run several, in one process or many: each job goes to one of them."""
    ran = 0
    while not stop.is_set():
        if await run_one(sessionmaker, queue, handler, retry_delay=retry_delay) is not None:
            ran += 1
            continue
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), idle)
    return ran
    # --8<-- [end:work]
