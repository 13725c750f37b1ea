"""How Alembic reaches the database: the project's settings, async, or a connection handed in.

* `alembic upgrade head` from a shell: the URL comes from the settings (DATABASE_URL or
  POSTGRES_*), never from alembic.ini, and the migrations run on an async engine.
* From running async code (app start-up, tests): pass a connection in
  `config.attributes["connection"]` (see `dblayer.migrate`); no second event loop is started.
* `alembic upgrade head --sql`: offline mode, SQL printed instead of executed.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection, pool
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from dblayer.engine import connect_args, describe_failure
from dblayer.models import Base
from dblayer.settings import get_settings

config = context.config
if config.config_file_name is not None:  # the `alembic` command: log as alembic.ini says
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata  # its naming convention names every constraint


# --8<-- [start:configure]
def _configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **options,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=get_settings().url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_with(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    settings = get_settings()
    engine = create_async_engine(
        settings.url, poolclass=pool.NullPool, connect_args=connect_args(settings)
    )
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
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif (connection := config.attributes.get("connection")) is not None:
    run_with(connection)  # handed in by running code: use it, start nothing
else:
    asyncio.run(run_async_migrations())
# --8<-- [end:configure]
