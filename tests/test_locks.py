"""Advisory locks (`dblayer.locks`) on separate engines, as separate replicas would hold them:
a transaction lock waits for its holder and ends with the transaction, however it ends; the
try-lock lets one of several instances run a periodic job, round after round; a session lock
on a pooled connection outlives the work (the pitfall the transaction locks avoid)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.engine import create_engine
from dblayer.locks import lock_key, run_alone, try_xact_lock, xact_lock
from dblayer.session import create_sessionmaker, session_scope
from tests.apps import settings_for

Maker = async_sessionmaker[AsyncSession]
INSTANCES = 5
ROUNDS = 20
# This database's only: other tests (and the other driver's run of this one) hold advisory locks
# in their own databases on the same server.
HELD = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def makers(database_url: URL) -> AsyncIterator[list[Maker]]:
    """One engine per instance: its own pool, as a replica of its own would have."""
    engines = [create_engine(settings_for(database_url)) for _ in range(INSTANCES)]
    yield [create_sessionmaker(engine) for engine in engines]
    for engine in engines:
        await engine.dispose()


def test_a_name_has_one_key_in_every_process() -> None:
    assert lock_key("nightly-report") == lock_key("nightly-report")
    assert lock_key("nightly-report") != lock_key("nightly-reports")
    # BLAKE2b is specified (RFC 7693): this value holds in every Python and on every machine.
    assert lock_key("") == -1970711489451281740
    keys = [lock_key(f"job {n}") for n in range(1000)]
    assert all(-(2**63) <= key < 2**63 for key in keys)
    assert min(keys) < 0 < max(keys)  # the whole bigint range, signed


async def _blocked(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"
        )
        return bool(await conn.scalar(text(query)))


async def _hold_then_end(
    first: Maker, second: Maker, engine: AsyncEngine, ending: str
) -> list[str]:
    """`first` holds the lock; `second` asks for it and waits; `first` ends its transaction."""
    order: list[str] = []

    async def waiter() -> None:
        async with session_scope(second) as session:
            await xact_lock(session, "report")
            order.append("waiter took it")

    async with session_scope(first) as holder:
        await xact_lock(holder, "report")
        waiting = asyncio.create_task(waiter())
        for _ in range(500):
            if await _blocked(engine):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second transaction never waited for the lock")
        order.append(f"holder ends ({ending})")
        if ending == "rollback":
            await holder.rollback()
    await asyncio.wait_for(waiting, 10)
    return order


async def test_a_transaction_lock_waits_for_its_holder_and_ends_with_the_transaction(
    makers: list[Maker], engine: AsyncEngine
) -> None:
    first, second = makers[:2]
    for ending in ("commit", "rollback") * 5:
        order = await _hold_then_end(first, second, engine, ending)
        assert order == [f"holder ends ({ending})", "waiter took it"]
        async with engine.connect() as conn:
            assert await conn.scalar(HELD) == 0


async def test_a_try_lock_never_waits(makers: list[Maker]) -> None:
    first, second = makers[:2]
    async with session_scope(first) as holder:
        assert await try_xact_lock(holder, "report")
        async with session_scope(second) as session:
            assert not await try_xact_lock(session, "report")
            assert await try_xact_lock(session, "another report")
    async with session_scope(second) as session:
        assert await try_xact_lock(session, "report")


async def _tick(makers: list[Maker]) -> list[bool]:
    """Every instance at once; the job lasts until every instance has looked at it."""
    looked, everyone_looked = 0, asyncio.Event()

    def look() -> None:
        nonlocal looked
        looked += 1
        if looked == INSTANCES:
            everyone_looked.set()

    async def job(session: AsyncSession) -> None:
        look()
        await asyncio.wait_for(everyone_looked.wait(), 10)

    async def instance(maker: Maker) -> bool:
        ran = await run_alone(maker, "cleanup", job)
        if not ran:
            look()
        return ran

    return await asyncio.gather(*(instance(maker) for maker in makers))


async def test_one_instance_of_several_runs_the_periodic_job(makers: list[Maker]) -> None:
    """Each round every instance ticks at once, and each tries while the job runs: exactly
    one ran it, every round."""
    for _ in range(ROUNDS):
        ran = await _tick(makers)
        assert sum(ran) == 1, ran


async def test_a_failed_job_releases_the_lock(makers: list[Maker]) -> None:
    async def failing(session: AsyncSession) -> None:
        raise ValueError("halfway")

    with pytest.raises(ValueError, match="halfway"):
        await run_alone(makers[0], "cleanup", failing)

    async def nothing(session: AsyncSession) -> None:
        pass

    assert await run_alone(makers[1], "cleanup", nothing)


async def test_a_session_lock_stays_with_the_pooled_connection(
    makers: list[Maker], engine: AsyncEngine
) -> None:
    """The pitfall: `pg_advisory_lock` survives the rollback, and the connection goes back to
    the pool holding it; another replica cannot take it until that connection is closed."""
    key = {"key": lock_key("report")}
    with pytest.raises(ValueError, match="halfway"):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:key)"), key)
            raise ValueError("halfway")
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    async with session_scope(makers[0]) as session:
        assert not await try_xact_lock(session, "report")
    await engine.dispose()  # the server's process ends, releasing the lock, a moment after
    for _ in range(50):
        async with session_scope(makers[0]) as session:
            if await try_xact_lock(session, "report"):
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the lock outlived the connection that held it by 5 s")
