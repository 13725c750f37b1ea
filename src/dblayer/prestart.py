"""`python -m dblayer.prestart`: run once before the app starts (a deploy step, an init container).

1. wait for the database, retrying while it is unreachable (it may be starting next to us);
2. upgrade it to the migrations' head;
3. seed the demo data, idempotently: a second run changes nothing.

Exit status 0 when all three are done, 1 with a one-line reason on stderr (no password) if not.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import sys

from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from dblayer.engine import DatabaseUnavailableError, check_connection, create_engine
from dblayer.migrate import current_revision, head_is_applied, head_revision, upgrade_with_lock
from dblayer.repositories import TaskRepository, UserRepository
from dblayer.retry import sqlstate
from dblayer.services import DuplicateError, UserService
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import SettingsError, get_settings

logger = logging.getLogger("dblayer.prestart")

DEMO_USERNAME = "demo"
DEMO_TASKS = ("Read the sessions chapter", "Try keyset pagination", "Break a commit on purpose")


# --8<-- [start:wait]
async def wait_for_database(engine: AsyncEngine, max_wait: float = 60.0) -> str:
    """The server version, once the database answers; retries with backoff up to `max_wait`
    seconds. Only unreachability is retried: a wrong password fails at once, the same way."""
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda e: isinstance(e, DatabaseUnavailableError) and e.transient),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(max_wait),
        before_sleep=_log_retry,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await check_connection(engine)
    except RetryError as error:
        raise error.last_attempt.result() from None  # the last DatabaseUnavailableError
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0
    logger.warning("database not ready (%s); retrying in %.1f s", error, wait)
    # --8<-- [end:wait]


# --8<-- [start:seed]
async def seed(session: AsyncSession) -> bool:
    """Create the demo user and their tasks unless they exist; True when something was created.

    Keyed on the username, and the unique index settles a race between two pre-start runs."""
    if await UserRepository(session).username_exists(DEMO_USERNAME):
        return False
    try:
        user = await UserService(session).create(
            email="demo@example.com",
            username=DEMO_USERNAME,
            password=secrets.token_urlsafe(16),  # nobody logs in as the demo user
            full_name="Demo User",
        )
    except DuplicateError:
        return False
    await TaskRepository(session).bulk_create(
        [{"title": title, "user_id": user.id} for title in DEMO_TASKS]
    )
    return True
    # --8<-- [end:seed]


# --8<-- [start:prestart]
async def prestart(max_wait: float = 60.0) -> list[str]:
    """Wait, migrate, seed; returns one line per step for the log. All three as the migrations'
    role (`MIGRATION_DATABASE_URL`; unset, the app's URL): the app's may not change the schema."""
    engine = create_engine(get_settings().for_migrations())
    try:
        version = await wait_for_database(engine, max_wait)
        revision = await current_revision(engine)
        if head_is_applied(revision) and revision != head_revision():
            # A newer release migrated it (a rolling deploy, a rollback of the code): what this
            # code needs is there, and it cannot migrate to a revision it does not know.
            migrations = (
                f"at {revision}, newer than this code's head {head_revision()}: left as it is"
            )
        else:
            # Under the migration lock: of replicas starting at once, one migrates.
            upgrade = await upgrade_with_lock(engine)
            migrations = (
                f"upgraded from {upgrade.before or 'base'} to head ({upgrade.after})"
                if upgrade.ran
                else f"at head ({upgrade.after})"
            )
        async with session_scope(create_sessionmaker(engine)) as session:
            created = await seed(session)
            tasks = await TaskRepository(session).count()
    finally:
        await engine.dispose()
    return [
        f"database: PostgreSQL {version} at {engine.url.host}:{engine.url.port}",
        f"migrations: {migrations}",
        f"seed: {'created' if created else 'already there, nothing changed'} ({tasks} tasks)",
    ]
    # --8<-- [end:prestart]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the database (60)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        lines = asyncio.run(prestart(args.timeout))
    except (SettingsError, DatabaseUnavailableError) as error:
        print(f"prestart failed: {error}", file=sys.stderr)
        return 1
    except DBAPIError as error:  # refused by the server: a migration, the seed
        print(f"prestart failed: {_server_message(error)}", file=sys.stderr)
        return 1
    except CommandError as error:  # refused by Alembic: the version table, the revisions
        print(f"prestart failed: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _server_message(error: DBAPIError) -> str:
    """The server's first message line and SQLSTATE, in the same words under both drivers (the
    statement and its parameters, which may hold a password, are left out)."""
    line = (str(error.orig).strip().splitlines() or ["unknown error"])[0]
    line = re.sub(r"^<class '[\w.]+'>: ", "", line)  # asyncpg's, as SQLAlchemy wraps it
    return f"{line} (SQLSTATE {sqlstate(error)})"


if __name__ == "__main__":
    sys.exit(main())
