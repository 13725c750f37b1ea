"""LISTEN/NOTIFY: send in the caller's transaction, listen on a connection of one's own.

`notify` sends with `pg_notify()`, in the session's transaction: the server delivers it at that
transaction's commit, and never if it rolls back. `listen` holds a connection no pool can lend
to anyone else (a pooled connection's LISTEN is rolled back, or left behind, when it goes back),
yields what arrives, and when that connection dies opens another and listens again. The server
keeps nothing for a channel nobody listens on: what was sent while the listener was away is
lost, which is why `on_listening` runs after every LISTEN (re-read the state there).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_random_exponential,
)

from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.settings import Settings

logger = logging.getLogger(__name__)


# --8<-- [start:notify]
async def notify(session: AsyncSession, channel: str, payload: str = "") -> None:
    """Send `payload` on `channel` when the session's transaction commits (never if it rolls
    back). Both are bound parameters of `pg_notify()`: no quoting, nothing to inject."""
    await session.execute(select(func.pg_notify(channel, payload)))
    # --8<-- [end:notify]


# --8<-- [start:listen]
@dataclass(frozen=True)
class Notification:
    channel: str
    payload: str


class ConnectionLostError(ConnectionError):
    """The listener's connection died; what is sent until it listens again is lost."""


async def listen(
    channels: Sequence[str],
    settings: Settings | None = None,
    *,
    on_listening: Callable[[], Awaitable[None]] | None = None,
    backoff: float = 0.1,
    max_backoff: float = 10.0,
) -> AsyncGenerator[Notification, None]:
    """Yield the notifications sent on `channels`, on a connection of the listener's own.

    After the connection dies, connects again (random waits below `backoff * 2**n` seconds,
    capped at `max_backoff`, while the server cannot be reached) and LISTENs again. Each time
    it listens, first time included, it awaits `on_listening()` before yielding anything: the
    place to re-read what the notifications are about. A setting that cannot work (a wrong
    password, a missing database) is raised at once. Close it with `contextlib.aclosing`."""
    engine = create_engine(settings)
    try:
        while True:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_may_reconnect),
                wait=wait_random_exponential(multiplier=backoff, max=max_backoff),
                before_sleep=_log_reconnect,
                reraise=True,
            ):
                with attempt:
                    connection, received = await _listening(engine, channels)
            try:
                if on_listening is not None:
                    await on_listening()
                async for notification in received:  # pragma: no branch - ends by raising
                    yield notification
            except ConnectionLostError as error:
                logger.warning("listener: %s; listening again", error)
                # jitter: listeners that lost the same server do not come back in step
                await asyncio.sleep(random.uniform(0, backoff))  # noqa: S311 - not a secret
            finally:
                await received.aclose()  # psycopg's notifies() holds the connection's lock
                await connection.invalidate()  # closed, never back in a pool with its LISTEN
    finally:
        await engine.dispose()


async def _listening(
    engine: AsyncEngine, channels: Sequence[str]
) -> tuple[AsyncConnection, AsyncGenerator[Notification, None]]:
    """Connect, LISTEN on every channel, and return what yields the notifications: the only
    place where the two drivers differ."""
    connection = await engine.connect()
    try:
        driver = (await connection.get_raw_connection()).driver_connection
        notifications: AsyncGenerator[Notification, None]
        if isinstance(driver, asyncpg.Connection):
            # asyncpg reads the socket by itself and calls back; a queue makes that iterable.
            queue: asyncio.Queue[Notification | None] = asyncio.Queue()

            def received(_: object, __: int, channel: str, payload: object) -> None:
                queue.put_nowait(Notification(channel, str(payload)))

            driver.add_termination_listener(lambda _: queue.put_nowait(None))
            for channel in channels:
                await driver.add_listener(channel, received)  # LISTEN, the name quoted
            notifications = _from_queue(queue)
        else:
            assert isinstance(driver, psycopg.AsyncConnection)
            quote = connection.dialect.identifier_preparer.quote_identifier  # "Jobs" stays Jobs
            for channel in channels:
                await connection.execute(text(f"LISTEN {quote(channel)}"))
            notifications = _from_psycopg(driver)
        await connection.commit()  # a LISTEN takes effect at commit, and none is delivered in one
        return connection, notifications
    except BaseException:
        await connection.invalidate()
        raise


async def _from_queue(
    queue: asyncio.Queue[Notification | None],
) -> AsyncGenerator[Notification, None]:
    while (notification := await queue.get()) is not None:
        yield notification
    raise ConnectionLostError("the connection was closed")


async def _from_psycopg(
    driver: psycopg.AsyncConnection,
) -> AsyncGenerator[Notification, None]:
    try:
        async for notify in driver.notifies():
            yield Notification(notify.channel, notify.payload)
    except psycopg.OperationalError as error:
        raise ConnectionLostError(str(error).strip().splitlines()[0]) from None
    raise ConnectionLostError("the connection was closed")  # pragma: no cover - not seen


def _may_reconnect(error: BaseException) -> bool:
    """Refused, timed out: the server may come back. Not a wrong password or database."""
    return isinstance(error, DatabaseUnavailableError) and error.transient


def _log_reconnect(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning("listener: %s; connecting again in %.2f s", error, wait)
    # --8<-- [end:listen]
