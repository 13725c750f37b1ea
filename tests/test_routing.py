"""`dblayer.routing` on a real primary with a real streaming replica (tests/replica.py): which
server answered is asked of the server itself (`pg_is_in_recovery()`: true on the replica)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.models import User
from dblayer.routing import RoutingSession, create_replica_engine, create_routing_sessionmaker
from dblayer.settings import Driver, Settings, get_settings
from dblayer.testing import connect
from tests.replica import ReplicaDatabases

ON_REPLICA = select(func.pg_is_in_recovery())  # true on the replica, false on the primary


@pytest.fixture
def settings(replica_databases: ReplicaDatabases, driver: Driver) -> Settings:
    _, environment = replica_databases.fresh(driver)
    return get_settings(
        database_url=environment["DATABASE_URL"],
        database_replica_url=environment["DATABASE_REPLICA_URL"],
    )


@pytest.fixture
async def engines(settings: Settings) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    primary = create_engine(settings)
    replica = create_replica_engine(settings)
    assert replica is not None
    yield primary, replica
    await primary.dispose()
    await replica.dispose()


@pytest.fixture
def sessionmaker(engines: tuple[AsyncEngine, AsyncEngine]) -> async_sessionmaker[AsyncSession]:
    return create_routing_sessionmaker(*engines)


def routing(session: AsyncSession) -> RoutingSession:
    assert isinstance(session.sync_session, RoutingSession)
    return session.sync_session


def a_user(name: str) -> User:
    return User(email=f"{name}@example.com", username=name, hashed_password="x")


async def test_reads_go_to_the_replica_and_a_write_sticks_to_the_primary(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as session:
        assert isinstance(session.sync_session, RoutingSession)
        assert await session.scalar(ON_REPLICA) is True
        assert await session.scalar(ON_REPLICA) is True  # reads stay there until a write
        values = {"email": "ada@example.com", "username": "ada", "hashed_password": "x"}
        statement = insert(User).values(values).returning(func.pg_is_in_recovery())
        assert await session.scalar(statement) is False  # the INSERT ran on the primary
        assert await session.scalar(ON_REPLICA) is False  # ... and so does all after it
        assert await session.scalar(select(User.username)) == "ada"  # read-your-writes
        await session.commit()
        assert await session.scalar(ON_REPLICA) is False  # the rest of the request, too
    async with sessionmaker() as session:  # the next request starts on the replica again
        assert await session.scalar(ON_REPLICA) is True


async def test_a_flush_goes_to_the_primary_and_sticks(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as session:
        session.add(a_user("grace"))
        await session.flush()
        assert routing(session).wrote
        assert await session.scalar(ON_REPLICA) is False
        assert await session.scalar(select(func.count()).select_from(User)) == 1
        await session.commit()
        await session.close()  # e.g. at the end of a request: reads may go to the replica again
        assert not routing(session).wrote
        assert await session.scalar(ON_REPLICA) is True


async def test_an_update_and_a_lock_go_to_the_primary(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as session:
        result = await session.execute(
            update(User).values(full_name="x").returning(func.pg_is_in_recovery())
        )
        assert result.all() == []  # no rows, but it ran: on the primary, and sticks
        assert await session.scalar(ON_REPLICA) is False
    async with sessionmaker() as session:
        assert await session.scalar(ON_REPLICA.with_for_update()) is False
        assert routing(session).wrote


async def test_text_and_a_bare_connection_go_to_the_primary(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """`text()` could be a write; `session.connection()` could be used for anything."""
    async with sessionmaker() as session:
        assert await session.scalar(text("SELECT pg_is_in_recovery()")) is False
    async with sessionmaker() as session:
        connection = await session.connection()
        assert await connection.scalar(ON_REPLICA) is False


async def test_without_a_replica_everything_goes_to_the_primary(
    settings: Settings, engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    without = settings.model_copy(update={"database_replica_url": None})
    assert create_replica_engine(without) is None
    sessionmaker = create_routing_sessionmaker(engines[0], None)
    async with sessionmaker() as session:
        assert await session.scalar(ON_REPLICA) is False
        assert not routing(session).wrote


async def test_a_write_sent_to_the_replica_is_refused_with_25006(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    async with engines[1].connect() as conn:
        with pytest.raises(DBAPIError) as caught:
            await conn.execute(insert(User).values(email="a@x", username="a", hashed_password=""))
    assert getattr(caught.value.orig, "sqlstate", None) == "25006"
    assert "cannot execute INSERT in a read-only transaction" in str(caught.value.orig)


async def test_a_replica_that_is_down_fails_reads_fast_and_writes_still_work(
    settings: Settings, engines: tuple[AsyncEngine, AsyncEngine]
) -> None:
    """Our choice: fail fast rather than move every read to the primary (see the module)."""
    replica_url = settings.for_replica()
    assert replica_url is not None
    down = replica_url.url.set(port=1).render_as_string(hide_password=False)
    database_url = settings.url.render_as_string(hide_password=False)
    broken = create_replica_engine(
        get_settings(database_url=database_url, database_replica_url=down)
    )
    assert broken is not None
    sessionmaker = create_routing_sessionmaker(engines[0], broken)
    try:
        async with sessionmaker() as session:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailableError, match=r"127\.0\.0\.1:1\b"):
                await session.scalar(ON_REPLICA)
            assert time.monotonic() - started < 2
        async with sessionmaker() as session:
            session.add(a_user("linus"))
            await session.commit()  # writes never needed the replica
            assert await session.scalar(select(User.username)) == "linus"  # sticky: primary
    finally:
        await broken.dispose()


def test_the_harness_resumes_a_paused_replica_before_the_next_block(
    replica_databases: ReplicaDatabases, driver: Driver
) -> None:
    """A block that paused the replay and failed before resuming it must not stall the next."""
    pair = replica_databases
    admin = pair.replica.url("postgres").set(drivername="postgresql")
    with connect(admin) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    name, environment = pair.fresh(driver)
    assert environment["DATABASE_REPLICA_URL"].endswith(f"/{name}")
    with connect(admin) as conn:
        row = conn.execute(
            "SELECT pg_get_wal_replay_pause_state(), %s IN (SELECT datname FROM pg_database)",
            (name,),
        ).fetchone()
    assert row == ("not paused", True)
