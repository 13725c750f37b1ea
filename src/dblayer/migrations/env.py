"""How Alembic reaches the database: the project's settings, async, or a connection handed in.

* `alembic upgrade head` from a shell: the URL comes from the settings (MIGRATION_DATABASE_URL,
  else DATABASE_URL or POSTGRES_*), never from alembic.ini, and the migrations run on an async
  engine.
* From running code (app start-up, tests, tools): `config.attributes["connection"]` may hold a
  `Connection` (see `dblayer.migrate`), an `Engine`, an `AsyncEngine` or an `AsyncConnection`.
* `alembic upgrade head --sql`: offline mode, SQL printed instead of executed.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, pool
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import in_greenlet

from dblayer.engine import connect_args, describe_failure
from dblayer.models import Base
from dblayer.settings import get_settings

config = context.config
if config.config_file_name is not None:  # the `alembic` command: log as alembic.ini says
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata  # its naming convention names every constraint


def _configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **options,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(
        url=get_settings().migration_url, literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_on(engine: AsyncEngine) -> None:
    try:
        try:
            connection = await engine.connect()
        except (DBAPIError, OSError, TimeoutError) as exc:
            # `alembic` prints a CommandError as one line: where, and why, never the password.
            raise CommandError(describe_failure(engine.url, exc)) from None
        try:
            await connection.run_sync(run_with)
        finally:
            await connection.close()
    finally:
        await engine.dispose()  # its pooled connections belong to this event loop, which ends here


def run_handed_in(handed: object) -> None:
    """What running code handed in, used where this is called from."""
    if isinstance(handed, Connection):
        run_with(handed)
    elif isinstance(handed, Engine):
        with handed.connect() as connection:
            run_with(connection)
    elif not isinstance(handed, AsyncEngine | AsyncConnection):
        raise CommandError(
            f'config.attributes["connection"] got a {type(handed).__name__}: expected a'
            " Connection, Engine, AsyncConnection or AsyncEngine"
        )
    elif in_greenlet():  # inside `run_sync()`: the async driver's calls are awaited for us
        if isinstance(handed, AsyncConnection):
            if handed.sync_connection is None:
                raise CommandError("the AsyncConnection is not connected: `async with` it first")
            run_with(handed.sync_connection)
        else:
            with handed.sync_engine.connect() as connection:
                run_with(connection)
    elif isinstance(handed, AsyncEngine) and not _loop_running():
        asyncio.run(run_on(handed))  # a synchronous caller (pytest-alembic): a loop of our own
    else:  # synchronous code on the loop's own thread cannot wait for that loop
        raise CommandError(
            f"an {type(handed).__name__} needs its event loop, which synchronous code cannot"
            " wait for: call the Alembic command inside `await connection.run_sync(...)`"
            " (see dblayer.migrate.upgrade_to_head)"
        )


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


if context.is_offline_mode():
    run_migrations_offline()
elif (handed := config.attributes.get("connection")) is not None:
    run_handed_in(handed)
else:  # MIGRATION_DATABASE_URL (a role that owns the schema), else the app's DATABASE_URL
    settings = get_settings().for_migrations()
    engine = create_async_engine(
        settings.url, poolclass=pool.NullPool, connect_args=connect_args(settings)
    )
    asyncio.run(run_on(engine))
