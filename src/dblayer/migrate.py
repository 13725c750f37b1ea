"""Run the migrations from Python: at start-up, from tests, from the pre-start script.

`upgrade_to_head(engine)` runs inside the caller's event loop by handing Alembic a connection
(`config.attributes["connection"]`), so it works where `asyncio.run()` would fail.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
)

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


# --8<-- [start:lock]
# The advisory lock every release takes around its upgrade: one fixed key, the same in every
# release, used for nothing else. Advisory locks are per database, so databases on one server
# do not wait for each other. Taken as one bigint that fits in 32 bits, pg_locks shows it as
# `objid` with `classid` 0 and `objsubid` 1 (two int4 keys would show `objsubid` 2).
MIGRATION_LOCK = 1_835_624_306  # 0x6d696772, "migr"
FIND_MIGRATOR = (
    "SELECT pid, state, query FROM pg_stat_activity WHERE pid IN (SELECT pid FROM pg_locks"
    " WHERE locktype = 'advisory' AND classid = 0 AND objid = 1835624306 AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


class MigrationLockTimeout(Exception):
    """Another migration held the lock for longer than this one would wait."""


@dataclass(frozen=True)
class Upgrade:
    """What `upgrade_with_lock` found and left: `before == after` when there was nothing to do."""

    before: str | None
    after: str | None

    @property
    def ran(self) -> bool:
        return self.before != self.after


async def upgrade_with_lock(
    engine: AsyncEngine, *, wait: float = 60.0, x_arguments: Sequence[str] = ()
) -> Upgrade:
    """Upgrade to head unless this code's head is applied, holding `MIGRATION_LOCK`, so that of
    several replicas starting at once one migrates and the others wait, then find nothing to do.

    The lock is a session lock on the connection Alembic runs on: it survives the commits of
    Alembic's transaction and of `autocommit_block()`, and ends with the session if the process
    dies. Waiting for it gives up after `wait` seconds with `MigrationLockTimeout`, so a stuck
    migrator does not hang every replica behind it (the orchestrator starts the replica again,
    which tries again)."""
    async with engine.connect() as connection:
        await _lock(connection, wait)
        try:
            return await connection.run_sync(_upgrade_unless_applied, x_arguments)
        finally:
            await connection.rollback()  # a failed revision may leave its transaction aborted
            await connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK}
            )
            await connection.commit()


async def _lock(connection: AsyncConnection, wait: float) -> None:
    """Try the lock, and again with backoff, for up to `wait` seconds. Not `pg_advisory_lock()`:
    a replica waiting inside that statement holds a snapshot, which `CREATE INDEX CONCURRENTLY`
    in the migrator's revision waits for, while the replica waits for the migrator: a deadlock.
    Between tries this connection is outside any transaction."""
    retrying = AsyncRetrying(
        retry=retry_if_result(lambda locked: not locked),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        stop=stop_after_delay(wait),
    )
    try:
        await retrying(_try_lock, connection)
    except RetryError:
        raise MigrationLockTimeout(
            f"another migration has held the migration lock for more than {wait:g} s;"
            f" find it with: {FIND_MIGRATOR}"
        ) from None


async def _try_lock(connection: AsyncConnection) -> bool:
    locked = await connection.scalar(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}
    )
    await connection.commit()  # the session lock stays; the transaction must not
    return bool(locked)


def _upgrade_unless_applied(connection: Connection, x_arguments: Sequence[str]) -> Upgrade:
    """Under the lock, read the revision again: another replica may have migrated meanwhile,
    or a newer release (a revision this code does not know: left alone, see `head_is_applied`)."""
    before = MigrationContext.configure(connection).get_current_revision()
    connection.rollback()  # Alembic gets the connection outside a transaction
    if head_is_applied(before):
        return Upgrade(before, before)
    upgrade(connection, x_arguments=x_arguments)
    return Upgrade(before, head_revision())
    # --8<-- [end:lock]
