"""The job queue (`dblayer.jobs`) under concurrency, on separate engines as separate worker
processes would have: every job runs once, however many workers race for it, round after round;
a worker that dies (its task cancelled, its connection killed) gives its job back; a failing
handler's writes are undone and its attempts counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import URL, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.engine import create_engine
from dblayer.jobs import claim, enqueue, run_one, work
from dblayer.models import Job, JobStatus, User
from dblayer.session import create_sessionmaker, session_scope
from tests.apps import settings_for

Maker = async_sessionmaker[AsyncSession]
WORKERS = 4
ROUNDS = 15
NOW = timedelta(0)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def engines(database_url: URL) -> AsyncIterator[list[AsyncEngine]]:
    """One engine per worker: its own pool, as a worker process of its own would have."""
    engines = [create_engine(settings_for(database_url)) for _ in range(WORKERS)]
    yield engines
    for engine in engines:
        await engine.dispose()


async def _enqueue(sessionmaker: Maker, count: int, queue: str = "q", **values: int) -> list[int]:
    async with session_scope(sessionmaker) as session:
        return [(await enqueue(session, queue, {"n": n}, **values)).id for n in range(count)]


async def _stored(sessionmaker: Maker, job_id: int) -> Job:
    async with sessionmaker() as session:
        return (await session.scalars(select(Job).where(Job.id == job_id))).one()


async def _nothing(session: AsyncSession, job: Job) -> None:
    pass


async def test_workers_holding_their_claims_at_once_hold_distinct_jobs(
    sessionmaker: Maker, engines: list[AsyncEngine]
) -> None:
    """Each round, four workers claim and then wait for each other, so all four claims are
    held at the same moment: four different jobs, the four oldest."""
    makers = [create_sessionmaker(engine) for engine in engines]
    for _ in range(ROUNDS):
        ids = await _enqueue(sessionmaker, WORKERS * 2)
        together = asyncio.Barrier(WORKERS)

        async def worker(maker: Maker, together: asyncio.Barrier = together) -> int:
            async with session_scope(maker) as session:
                job = await claim(session, "q")
                assert job is not None
                await together.wait()
                job.status = JobStatus.DONE
                return job.id

        taken = await asyncio.gather(*(worker(maker) for maker in makers))
        assert sorted(taken) == ids[:WORKERS]
        async with session_scope(sessionmaker) as session:  # leave the next round a clean queue
            await session.execute(text("UPDATE jobs SET status = 'DONE'"))


async def test_racing_workers_run_every_job_once(
    sessionmaker: Maker, engines: list[AsyncEngine]
) -> None:
    """`work` on four engines drains the queue round after round: each job ran once, all are
    done at their first attempt, and the workers did overlap."""
    runs: Counter[int] = Counter()
    running = most_running = 0
    stop, expected = asyncio.Event(), 0

    async def handler(session: AsyncSession, job: Job) -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.001)
        running -= 1
        runs[job.id] += 1
        if len(runs) == expected:
            stop.set()

    for _ in range(ROUNDS):
        await _enqueue(sessionmaker, 20)
        stop, expected = asyncio.Event(), expected + 20
        workers = (
            work(create_sessionmaker(engine), "q", handler, stop=stop, idle=0.01)
            for engine in engines
        )
        ran = await asyncio.gather(*workers)
        assert sum(ran) == 20
    assert len(runs) == ROUNDS * 20
    assert set(runs.values()) == {1}, [job for job, n in runs.items() if n > 1]
    assert most_running > 1, "the workers never overlapped"
    async with sessionmaker() as session:
        stored = await session.execute(
            select(Job.status, func.count(), func.max(Job.attempts)).group_by(Job.status)
        )
        assert [tuple(row) for row in stored] == [(JobStatus.DONE, ROUNDS * 20, 1)]


async def test_a_cancelled_worker_gives_its_job_back(
    sessionmaker: Maker, engines: list[AsyncEngine]
) -> None:
    first, second = (create_sessionmaker(engine) for engine in engines[:2])
    started: asyncio.Queue[int] = asyncio.Queue()

    async def slow(session: AsyncSession, job: Job) -> None:
        await started.put(job.id)
        await asyncio.sleep(60)

    for _ in range(ROUNDS):
        [job_id] = await _enqueue(sessionmaker, 1)
        dying = asyncio.create_task(run_one(first, "q", slow))
        assert await started.get() == job_id
        assert await run_one(second, "q", _nothing) is None  # held: skipped, not waited for
        dying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dying
        taken = await run_one(second, "q", _nothing)
        assert taken is not None
        assert (taken.id, taken.attempts, taken.status) == (job_id, 1, JobStatus.DONE)


async def test_a_worker_whose_connection_is_killed_gives_its_job_back(
    sessionmaker: Maker, engines: list[AsyncEngine], engine: AsyncEngine
) -> None:
    first, second = (create_sessionmaker(engine) for engine in engines[:2])
    started: asyncio.Queue[int] = asyncio.Queue()

    async def stepwise(session: AsyncSession, job: Job) -> None:
        await started.put(await session.scalar(text("SELECT pg_backend_pid()")))
        for _ in range(600):
            await asyncio.sleep(0.05)
            await session.execute(text("SELECT 1"))

    for _ in range(5):
        [job_id] = await _enqueue(sessionmaker, 1)
        dying = asyncio.create_task(run_one(first, "q", stepwise))
        pid = await started.get()
        async with engine.connect() as conn:
            # true once its process, and so its row lock, is gone (waits up to 5 s)
            assert await conn.scalar(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
        with pytest.raises(DBAPIError) as lost:
            await dying
        assert lost.value.connection_invalidated
        taken = await run_one(second, "q", _nothing)
        assert taken is not None
        assert (taken.id, taken.attempts, taken.status) == (job_id, 1, JobStatus.DONE)


async def test_a_failing_handler_s_writes_are_undone_and_its_attempts_counted(
    sessionmaker: Maker,
) -> None:
    [job_id] = await _enqueue(sessionmaker, 1, max_attempts=2)

    async def failing(session: AsyncSession, job: Job) -> None:
        name = f"u{job.attempts}"
        session.add(User(email=f"{name}@example.com", username=name, hashed_password="x"))
        job.payload = {"changed": True}
        await session.flush()
        raise ValueError(f"attempt {job.attempts}")

    first = await run_one(sessionmaker, "q", failing, retry_delay=NOW)
    assert first is not None
    assert (first.status, first.attempts, first.last_error) == (
        JobStatus.QUEUED,
        1,
        "ValueError: attempt 1",
    )
    second = await run_one(sessionmaker, "q", failing, retry_delay=NOW)
    assert second is not None
    assert (second.status, second.attempts) == (JobStatus.FAILED, 2)
    assert await run_one(sessionmaker, "q", failing) is None  # failed jobs are not retried
    stored = await _stored(sessionmaker, job_id)
    assert (stored.status, stored.payload, stored.last_error) == (
        JobStatus.FAILED,
        {"n": 0},
        "ValueError: attempt 2",
    )
    async with sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 0


async def test_a_retry_waits_a_delay_that_doubles(sessionmaker: Maker) -> None:
    [job_id] = await _enqueue(sessionmaker, 1, max_attempts=5)

    async def failing(session: AsyncSession, job: Job) -> None:
        raise ValueError("no")

    delays = []
    for _ in range(3):
        assert await run_one(sessionmaker, "q", failing, retry_delay=timedelta(hours=1))
        assert await run_one(sessionmaker, "q", failing) is None  # not due yet
        async with session_scope(sessionmaker) as session:
            delay = await session.scalar(select(Job.run_after - func.now()))
            assert delay is not None
            delays.append(round(delay.total_seconds() / 3600))
            await session.execute(text("UPDATE jobs SET run_after = now()"))  # time passes
    assert delays == [1, 2, 4]
    assert (await _stored(sessionmaker, job_id)).attempts == 3


async def test_queues_are_separate_and_an_empty_one_gives_none(sessionmaker: Maker) -> None:
    assert await run_one(sessionmaker, "q", _nothing) is None
    [other] = await _enqueue(sessionmaker, 1, queue="other")
    assert await run_one(sessionmaker, "q", _nothing) is None
    taken = await run_one(sessionmaker, "other", _nothing)
    assert taken is not None
    assert taken.id == other


async def test_a_job_is_enqueued_only_if_the_caller_commits(sessionmaker: Maker) -> None:
    with pytest.raises(RuntimeError):
        async with session_scope(sessionmaker) as session:
            await enqueue(session, "q", {"order": 1})
            raise RuntimeError("the order was not saved")
    assert await run_one(sessionmaker, "q", _nothing) is None


async def test_work_waits_while_the_queue_is_empty_and_stops_when_told(
    sessionmaker: Maker,
) -> None:
    stop, ran = asyncio.Event(), asyncio.Event()

    async def handler(session: AsyncSession, job: Job) -> None:
        ran.set()

    worker = asyncio.create_task(work(sessionmaker, "q", handler, stop=stop, idle=0.02))
    await asyncio.sleep(0.1)  # several empty looks
    assert not worker.done()
    await _enqueue(sessionmaker, 1)
    await asyncio.wait_for(ran.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(worker, 10) == 1
