"""Advisory locks: a lock on a name of your choosing, not on a row, held by PostgreSQL.

Two kinds, and which one to take matters with a pool. A *session* lock
(`pg_advisory_lock`) belongs to the connection: commit and rollback leave it held, and when the
connection goes back to the pool it stays held there, idle, until someone unlocks it on that
very connection. A *transaction* lock (`pg_advisory_xact_lock`) ends with the transaction,
whichever way it ends: it cannot outlive the work. These helpers take transaction locks. A
session lock belongs on a connection of its own that unlocks in `finally`, as
`dblayer.migrate.upgrade_with_lock` does around migrations that commit several times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

from sqlalchemy import BigInteger, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from dblayer.session import session_scope


# --8<-- [start:key]
def lock_key(name: str) -> int:
    """The lock's 64-bit key: the first 8 bytes of BLAKE2b of its name, as a signed bigint.
    The same in every process, release and PostgreSQL major (Python's `hash()` of a string
    changes with each process; PostgreSQL's `hashtext()` is undocumented, and 32 bits only)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _key(name: str) -> object:
    return bindparam("key", lock_key(name), type_=BigInteger)  # pg_advisory_*(bigint)
    # --8<-- [end:key]


# --8<-- [start:xact]
async def xact_lock(session: AsyncSession | AsyncConnection, name: str) -> None:
    """Wait for the lock `name`, held until this transaction commits or rolls back."""
    await session.execute(select(func.pg_advisory_xact_lock(_key(name))))


async def try_xact_lock(session: AsyncSession | AsyncConnection, name: str) -> bool:
    """Take the lock `name` for this transaction if nobody holds it; never wait."""
    return bool(await session.scalar(select(func.pg_try_advisory_xact_lock(_key(name)))))
    # --8<-- [end:xact]


# --8<-- [start:run_alone]
async def run_alone(
    sessionmaker: async_sessionmaker[AsyncSession],
    name: str,
    job: Callable[[AsyncSession], Awaitable[None]],
) -> bool:
    """Run `job` in a transaction holding the lock `name`, and return True; or return False at
    once if another instance holds it (it is running the job right now). For a periodic job
    that every replica schedules: one runs it, the others skip this turn."""
    async with session_scope(sessionmaker) as session:
        if not await try_xact_lock(session, name):
            return False
        await job(session)
    return True
    # --8<-- [end:run_alone]
