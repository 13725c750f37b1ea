"""Run the migrations from Python: at start-up, from tests, from the pre-start script.

`upgrade_to_head(engine)` runs inside the caller's event loop by handing Alembic a connection
(`config.attributes["connection"]`), so it works where `asyncio.run()` would fail.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


# --8<-- [start:upgrade]
def alembic_config() -> Config:
    """The configuration alembic.ini describes, without needing the file (an installed package)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def upgrade_to_head(
    engine: AsyncEngine, revision: str = "head", *, x_arguments: Sequence[str] = ()
) -> None:
    """Upgrade the database to `revision` on the caller's event loop.

    The connection is handed over outside a transaction: Alembic runs the revisions in one of its
    own, and a revision may step out of it (`autocommit_block()`, for CREATE INDEX CONCURRENTLY).
    `x_arguments` are what `alembic -x key=value` passes (revision 0002 reads `lock_timeout`).
    """
    async with engine.connect() as connection:
        await connection.run_sync(upgrade, revision, x_arguments=x_arguments)


async def downgrade_to(
    engine: AsyncEngine, revision: str = "base", *, x_arguments: Sequence[str] = ()
) -> None:
    """Downgrade to `revision` (`base`: an empty schema), the same way."""
    async with engine.connect() as connection:
        await connection.run_sync(_run, command.downgrade, revision, x_arguments)


def upgrade(
    connection: Connection, revision: str = "head", *, x_arguments: Sequence[str] = ()
) -> None:
    """The synchronous core, for code that holds a plain `Connection` (outside a transaction)."""
    _run(connection, command.upgrade, revision, x_arguments)


def _run(
    connection: Connection,
    action: Callable[[Config, str], None],
    revision: str,
    x_arguments: Sequence[str],
) -> None:
    config = alembic_config()
    config.cmd_opts = Namespace(x=list(x_arguments))  # where `alembic -x` puts them
    config.attributes["connection"] = connection
    action(config, revision)
    # --8<-- [end:upgrade]


# --8<-- [start:revisions]
def head_revision() -> str | None:
    """The newest revision in the code."""
    return _revisions()[0]


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
        # --8<-- [end:revisions]


# --8<-- [start:head_applied]
def head_is_applied(current: str | None) -> bool:
    """Whether a database at revision `current` has everything this code needs: it is at this
    code's head, or at a revision this code does not know, which a newer release added."""
    head, known = _revisions()
    return current is not None and (current == head or current not in known)


@cache
def _revisions() -> tuple[str | None, frozenset[str]]:
    """This code's head and every revision it knows; the files do not change while it runs,
    so a readiness probe does not read them again each time."""
    script = ScriptDirectory.from_config(alembic_config())
    known = frozenset(revision.revision for revision in script.walk_revisions())
    return script.get_current_head(), known
    # --8<-- [end:head_applied]
