"""`dblayer.routing` on a real primary with a real streaming replica (tests/replica.py): which
server answered is asked of the server itself (`pg_is_in_recovery()`: true on the replica)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import SecretStr
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.api import create_app
from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.models import User
from dblayer.routing import RoutingSession, create_replica_engine, create_routing_sessionmaker
from dblayer.settings import Driver, Settings, get_settings
from dblayer.testing import connect
from tests.apps import client_for, new_user
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
            assert time.monotonic() - started < settings.db_connect_timeout  # refused: fast
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


@contextlib.contextmanager
def paused(pair: ReplicaDatabases) -> Iterator[None]:
    """The replica's replay paused (it keeps serving what it has replayed), then resumed."""
    pair.wait_for_replica()
    admin = pair.replica.url("postgres").set(drivername="postgresql")
    with connect(admin) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        while conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() != ("paused",):
            time.sleep(0.01)
    try:
        yield
    finally:
        pair.wait_for_replica()  # resumes it, and waits until it has caught up


async def test_the_app_reads_from_the_replica_and_writes_to_the_primary(
    settings: Settings, replica_databases: ReplicaDatabases
) -> None:
    app = create_app(settings)
    async for client in client_for(app):
        assert app.state.replica_engine is not None
        ada = await new_user(client)
        with paused(replica_databases):
            created = await client.post("/tasks", json={"user_id": ada["id"], "title": "write"})
            assert created.status_code == 201  # written on the primary
            assert (await client.get("/tasks")).json()["items"] == []  # the paused replica
            assert (await client.get(f"/tasks/{created.json()['id']}")).status_code == 404
        assert (await client.get("/tasks")).json()["items"] == [created.json()]  # caught up


async def test_a_request_that_may_write_reads_on_the_primary(
    settings: Settings, replica_databases: ReplicaDatabases
) -> None:
    """The services read before they write (the user a task is for, a taken email): on a replica
    behind, a task for a user created a moment ago would be a 404, and a replica that is down
    would fail every POST. A POST, PUT, PATCH or DELETE request runs on the primary throughout."""
    app = create_app(settings)
    async for client in client_for(app):
        with paused(replica_databases):
            ada = await new_user(client)  # on the primary only, for now
            task = {"user_id": ada["id"], "title": "for a user the replica has not seen"}
            assert (await client.post("/tasks", json=task)).status_code == 201
            assert (await client.get(f"/users/{ada['id']}")).status_code == 404  # a GET: replica
    replica = settings.for_replica()
    assert replica is not None
    down = replica.url.set(port=1).render_as_string(hide_password=False)
    app = create_app(settings.model_copy(update={"database_replica_url": SecretStr(down)}))
    async for client in client_for(app):
        ada = await new_user(client, "grace")  # writes while the replica is down
        task = {"user_id": ada["id"], "title": "no replica needed"}
        assert (await client.post("/tasks", json=task)).status_code == 201


async def test_without_a_replica_url_the_app_has_no_replica_engine(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"database_replica_url": None}))
    async for client in client_for(app):
        assert app.state.replica_engine is None
        ada = await new_user(client)
        assert (await client.get(f"/users/{ada['id']}")).status_code == 200  # the primary's


async def test_the_app_answers_a_replica_that_is_down_with_503(settings: Settings) -> None:
    replica = settings.for_replica()
    assert replica is not None
    down = replica.url.set(port=1).render_as_string(hide_password=False)
    app = create_app(settings.model_copy(update={"database_replica_url": SecretStr(down)}))
    async for client in client_for(app):
        response = await client.get("/tasks")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert (await client.get(f"/users/{uuid.uuid4()}")).status_code == 503
        assert (await client.get("/ready")).status_code == 200  # asks the primary only


async def test_a_read_that_feeds_a_write_is_sent_to_the_primary(
    sessionmaker: async_sessionmaker[AsyncSession], replica_databases: ReplicaDatabases
) -> None:
    """Read, change, commit: read on a replica behind, the commit would overwrite a newer value
    with the stale row's (a lost update). `primary=True` or `with_for_update()` read the primary."""
    async with sessionmaker() as session:
        session.add(a_user("ada"))
        await session.commit()
    with paused(replica_databases):
        async with sessionmaker() as session:  # another request changes the name
            await session.execute(update(User).values(full_name="Ada Lovelace"))
            await session.commit()
        async with sessionmaker() as session:
            stale = await session.scalar(select(User))  # the replica's row, from before
            assert stale is not None
            assert stale.full_name is None
        for read in (
            select(User).execution_options(primary=True),
            select(User).with_for_update(),
        ):
            async with sessionmaker() as session:
                user = await session.scalar(read)
                assert user is not None
                assert user.full_name == "Ada Lovelace"
                assert routing(session).wrote  # the rest of the request stays there


async def test_selects_that_write_go_to_the_primary(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """A data-modifying CTE is seen; a function that writes (nextval) is not: say `primary=True`."""
    values = {"email": "x@example.com", "username": "x", "hashed_password": "x"}
    written = insert(User).values(values).returning(User.username).cte()
    async with sessionmaker() as session:
        assert await session.scalar(select(written.c.username)) == "x"
        assert routing(session).wrote
        await session.commit()
    async with sessionmaker() as session:
        with pytest.raises(DBAPIError, match="during recovery"):
            await session.scalar(select(func.txid_current()))
    async with sessionmaker() as session:
        txid = select(func.txid_current()).execution_options(primary=True)
        assert isinstance(await session.scalar(txid), int)
