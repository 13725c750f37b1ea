"""Re-running a unit of work that lost a conflict with a concurrent one.

PostgreSQL rolls back a transaction it picked as the victim of a deadlock (SQLSTATE 40P01) or
that could not be serialized with the others (40001, under REPEATABLE READ and SERIALIZABLE):
the transaction is gone, so the only correct retry is the whole unit of work, in a new
transaction, reading again what it decided on. Re-running only the failed statement would run
it in a transaction that no longer exists, on reads that may no longer be true.

Only those two are retried. Anything else (a unique or check violation, a bug, a lost
connection whose commit may or may not have happened) is raised at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from dblayer.session import IsolationLevel, session_scope

logger = logging.getLogger(__name__)

T = TypeVar("T")


# --8<-- [start:classify]
# serialization_failure and deadlock_detected: the server rolled the transaction back, and the
# same work run again may well succeed. Both drivers put the SQLSTATE on the driver's exception,
# which SQLAlchemy keeps as `.orig`.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a database error (`exc.orig.sqlstate`), else None."""
    if isinstance(error, DBAPIError):
        code = getattr(error.orig, "sqlstate", None)
        return str(code) if code else None
    return None


def is_retryable(error: BaseException) -> bool:
    """A deadlock victim or a serialization failure: the whole unit of work may be re-run."""
    return sqlstate(error) in RETRYABLE_SQLSTATES
    # --8<-- [end:classify]


# --8<-- [start:run_in_transaction]
async def run_in_transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = 5,
    backoff: float = 0.05,
    max_backoff: float = 2.0,
    isolation_level: IsolationLevel | None = None,
) -> T:
    """Run `work(session)` in a transaction of its own and commit; re-run all of it, in a new
    session, when the server rolled it back for a deadlock or a serialization failure.

    At most `attempts` runs, with a random wait (full jitter) below `backoff * 2**n` seconds,
    capped at `max_backoff`, between them, so that the transactions that collided do not collide
    again in step. After the last attempt its error is raised as it is; any other error at once.
    `work` must do nothing it cannot do twice (send no e-mail, call no payment API): only what
    the database rolls back is undone. `isolation_level` applies to every attempt's transaction,
    set before its first statement (see `session_scope`)."""
    if attempts < 1:
        raise ValueError("attempts must be 1 or more")
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        wait=wait_random_exponential(multiplier=backoff, max=max_backoff),
        stop=stop_after_attempt(attempts),
        before_sleep=lambda state: _log_retry(state, attempts),
        reraise=True,  # the last database error itself, not tenacity's RetryError
    )
    async for attempt in retrying:
        with attempt:
            # commits, or rolls back
            async with session_scope(sessionmaker, isolation_level=isolation_level) as session:
                return await work(session)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _log_retry(state: RetryCallState, attempts: int) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    assert isinstance(error, DBAPIError)  # only those are retried
    message = str(error.orig).strip().splitlines()[0]  # the server's first line: no values
    logger.warning(
        "unit of work rolled back (%s %s), attempt %d of %d; running it again in %.2f s",
        sqlstate(error),
        message,
        state.attempt_number,
        attempts,
        wait,
    )
    # --8<-- [end:run_in_transaction]
