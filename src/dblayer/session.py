"""Sessions: one factory per engine, one session per unit of work (and per task).

`session_scope` is the unit of work: everything inside commits together when the block ends
normally and is rolled back when it raises, so an error never leaves half a change behind.
Repositories and services take the session; only the code that opened the scope commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker


# --8<-- [start:sessionmaker]
def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The session factory: create it once, next to the engine."""
    return async_sessionmaker(
        engine,
        # Objects stay readable after commit. With the default (True) every attribute would be
        # reloaded on next access, which async code cannot do implicitly (MissingGreenlet).
        expire_on_commit=False,
        # Flush pending changes before each query, so a query sees what this session added.
        # (Off, a query could miss a row added a line earlier.)
        autoflush=True,
    )
    # --8<-- [end:sessionmaker]


# --8<-- [start:session_scope]
IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]


@asynccontextmanager
async def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    isolation_level: IsolationLevel | None = None,
) -> AsyncIterator[AsyncSession]:
    """A session in a transaction: committed when the block succeeds, rolled back when it raises
    (also when the task is cancelled), and closed (its connection returned) either way.
    `isolation_level` applies to this transaction only (else the engine's, the server's)."""
    async with sessionmaker() as session, session.begin():
        if isolation_level is not None:
            # First, before any statement: once the transaction has a connection, SQLAlchemy
            # ignores the option with only a warning. The pool resets it on return.
            await session.connection(execution_options={"isolation_level": isolation_level})
        yield session
    # --8<-- [end:session_scope]
