"""What tools hand `env.py` in `config.attributes["connection"]`: a `Connection` (Alembic's
cookbook), an `Engine` or an `AsyncEngine` (pytest-alembic's `alembic_engine`), an
`AsyncConnection`. Each one migrates the database it points at."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import pytest_alembic
import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from pytest_alembic import tests as builtin
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from dblayer.engine import create_engine
from dblayer.migrate import alembic_config, head_revision
from dblayer.settings import Driver, get_settings
from tests.databases import Databases


def _config(connectable: object) -> Config:
    config = alembic_config()
    config.attributes["connection"] = connectable
    return config


def _down_and_up(connectable: object) -> None:
    """Without the handed-in object env.py would use the settings, which point nowhere here."""
    config = _config(connectable)
    command.downgrade(config, "base")
    command.upgrade(config, "head")


@pytest.fixture
def sync_engine(databases: Databases, fresh_database: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(databases.url(fresh_database, "psycopg"), poolclass=NullPool)
    yield engine
    engine.dispose()


def _current(engine: sqlalchemy.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_a_connection(sync_engine: sqlalchemy.Engine) -> None:
    with sync_engine.connect() as conn:
        _down_and_up(conn)
    assert _current(sync_engine) == head_revision()


def test_an_engine(sync_engine: sqlalchemy.Engine) -> None:
    _down_and_up(sync_engine)
    assert _current(sync_engine) == head_revision()


@pytest.fixture
def app_engine(databases: Databases, fresh_database: str, driver: Driver) -> Iterator[AsyncEngine]:
    """The app's engine for a synchronous test: made and disposed outside any event loop (the async
    tests use conftest's `engine`, disposed on their own loop)."""
    url = databases.url(fresh_database, driver).render_as_string(hide_password=False)
    engine = create_engine(get_settings(database_url=url))
    yield engine
    asyncio.run(engine.dispose())


def test_an_async_engine_from_synchronous_code(
    app_engine: AsyncEngine, sync_engine: sqlalchemy.Engine
) -> None:
    """pytest-alembic's case: Alembic's commands called synchronously, no event loop running."""
    _down_and_up(app_engine)
    _down_and_up(app_engine)  # again, on a new event loop: nothing of the first one is reused
    assert _current(sync_engine) == head_revision()


async def test_an_async_engine_inside_run_sync(
    engine: AsyncEngine, sync_engine: sqlalchemy.Engine
) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(lambda _: _down_and_up(engine))
    assert _current(sync_engine) == head_revision()


async def test_an_async_connection_inside_run_sync(
    engine: AsyncEngine, sync_engine: sqlalchemy.Engine
) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(lambda _: _down_and_up(conn))
    assert _current(sync_engine) == head_revision()


async def test_async_objects_called_from_the_event_loop_itself_are_refused(
    engine: AsyncEngine,
) -> None:
    """Synchronous code on the loop's own thread cannot wait for that loop: a clear error."""
    message = r"inside `await connection\.run_sync\(\.\.\.\)`"
    with pytest.raises(CommandError, match=message):
        _down_and_up(engine)
    async with engine.connect() as conn:
        with pytest.raises(CommandError, match=message):
            _down_and_up(conn)
        unstarted = engine.connect()  # not awaited: no database connection behind it yet
        with pytest.raises(CommandError, match="not connected"):
            await conn.run_sync(lambda _: _down_and_up(unstarted))


def test_anything_else_is_refused() -> None:
    with pytest.raises(CommandError, match="got a str"):
        _down_and_up("postgresql://app@db/app")


# pytest-alembic's built-in tests, the four `--test-alembic` runs by default, called as the
# functions they are: its plugin cannot collect them under pytest 9 (its collector sets
# `_nodeid`, which pytest no longer has), so pyproject.toml loads it with `-p no:pytest_alembic`
# and this module builds the runner its `alembic_runner` fixture would.
BUILT_IN = (
    builtin.test_single_head_revision,
    builtin.test_upgrade,
    builtin.test_model_definitions_match_ddl,
    builtin.test_up_down_consistency,
)
# The engines pytest-alembic's documentation sets up as `alembic_engine`: a sync one, and the app's
# async engine (each driver); the built-in tests call Alembic synchronously with it.
ENGINES = ("Engine-psycopg", "AsyncEngine-asyncpg", "AsyncEngine-psycopg")


@pytest.fixture(params=ENGINES)
def alembic_engine(
    request: pytest.FixtureRequest, databases: Databases
) -> Iterator[sqlalchemy.Engine | AsyncEngine]:
    """An engine on an empty database of its own: the built-in tests start from base."""
    kind, driver = str(request.param).split("-")
    name = databases.clone(empty=True)
    url = databases.url(name, "psycopg" if driver == "psycopg" else "asyncpg")
    try:
        if kind == "Engine":
            engine = sqlalchemy.create_engine(url, poolclass=NullPool)
            yield engine
            engine.dispose()
        else:
            app = create_engine(
                get_settings(database_url=url.render_as_string(hide_password=False))
            )
            yield app
            asyncio.run(app.dispose())
    finally:
        databases.drop(name)


@pytest.fixture
def alembic_runner(
    alembic_engine: sqlalchemy.Engine | AsyncEngine,
) -> Iterator[pytest_alembic.MigrationContext]:
    config = pytest_alembic.Config(alembic_config=alembic_config())
    with pytest_alembic.runner(config=config, engine=alembic_engine) as runner:  # type: ignore[arg-type]
        yield runner


@pytest.mark.parametrize("check", BUILT_IN, ids=lambda check: check.__name__)
def test_pytest_alembic(
    check: Callable[[pytest_alembic.MigrationContext], None],
    alembic_runner: pytest_alembic.MigrationContext,
) -> None:
    check(alembic_runner)
