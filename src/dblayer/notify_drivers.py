"""The listener's connection under each driver: LISTEN, read, check, and say "lost" alike.

asyncpg reads the socket by itself and calls back for each notification; psycopg yields them
from `notifies()` when asked. Each says that a connection is lost its own way. `listening`
hides both from `dblayer.notify.listen`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import asyncpg
import psycopg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dblayer.engine import DatabaseUnavailableError

logger = logging.getLogger("dblayer.notify")


@dataclass(frozen=True)
class Notification:
    channel: str
    payload: str
    pid: int = field(default=0, compare=False, repr=False)  # the sender's server process


class ConnectionLostError(ConnectionError):
    """The listener's connection is lost, or fell behind: what is sent until it listens again
    does not reach it."""


@asynccontextmanager
async def listening(
    engine: AsyncEngine, channels: Sequence[str], check_every: float, max_queued: int
) -> AsyncIterator[AsyncGenerator[Notification, None]]:
    """Connect, LISTEN on every channel, and give what yields the notifications: the only place
    where the two drivers differ. Closed on the way out, even when cancelled again meanwhile."""
    connection: AsyncConnection | None = None
    received: AsyncGenerator[Notification, None] | None = None
    try:
        with _as_lost():
            connection = await engine.connect()
            # a listener is idle by design: a database's idle_session_timeout must not end it
            await connection.execute(text("SET idle_session_timeout = 0"))
            driver = (await connection.get_raw_connection()).driver_connection
            if isinstance(driver, asyncpg.Connection):
                # asyncpg reads the socket by itself and calls back; an inbox makes it iterable
                inbox = _Inbox(max_queued)
                driver.add_termination_listener(inbox.closed)
                for channel in channels:
                    await driver.add_listener(channel, inbox.received)  # LISTEN, name quoted
                received = _from_inbox(connection, inbox, check_every)
            else:
                assert isinstance(driver, psycopg.AsyncConnection)
                quote = connection.dialect.identifier_preparer.quote_identifier  # Jobs stays Jobs
                for channel in channels:
                    await connection.execute(text(f"LISTEN {quote(channel)}"))
                received = _from_psycopg(connection, driver, check_every)
            await connection.commit()  # a LISTEN takes effect at commit
        yield received
    finally:
        await asyncio.shield(_close(connection, received))


async def _close(
    connection: AsyncConnection | None, received: AsyncGenerator[Notification, None] | None
) -> None:
    if received is not None:
        await received.aclose()  # psycopg's notifies() holds the connection's lock
    if connection is not None:
        await connection.invalidate()  # closed, never back in a pool with its LISTEN


class _Inbox:
    """asyncpg's notifications wait here to be read, at most `limit` of them: past it the rest
    are dropped, and reading ends as if the connection were lost (memory stays bounded)."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[Notification | ConnectionLostError] = asyncio.Queue()
        self.limit = limit
        self.ended = False

    def received(self, _: object, pid: int, channel: str, payload: object) -> None:
        if self.queue.qsize() < self.limit:
            self.put(Notification(channel, str(payload), pid))
        elif not self.ended:
            lost = ConnectionLostError(f"{self.limit} notifications unread, the next dropped")
            logger.warning("listener: %s", lost)  # now, not when the reader gets to it
            self.put(lost)

    def closed(self, _: object) -> None:
        self.put(ConnectionLostError("the connection was closed"))

    def put(self, item: Notification | ConnectionLostError) -> None:
        if not self.ended:
            self.ended = isinstance(item, ConnectionLostError)
            self.queue.put_nowait(item)


async def _from_inbox(
    connection: AsyncConnection, inbox: _Inbox, check_every: float
) -> AsyncGenerator[Notification, None]:
    while True:
        try:
            item = await asyncio.wait_for(inbox.queue.get(), check_every)
        except TimeoutError:
            await _check(connection, check_every)
            continue
        if isinstance(item, ConnectionLostError):
            raise item
        yield item


async def _from_psycopg(
    connection: AsyncConnection, driver: psycopg.AsyncConnection, check_every: float
) -> AsyncGenerator[Notification, None]:
    while True:  # psycopg >= 3.2.4 keeps what arrives between two notifies()
        with _as_lost():
            async with aclosing(driver.notifies(timeout=check_every)) as notifies:
                async for notify in notifies:
                    yield Notification(notify.channel, notify.payload, notify.pid)
        await _check(connection, check_every)


async def _check(connection: AsyncConnection, seconds: float) -> None:
    """A server gone without a word (a failover, a partition) sends nothing (asyncpg sets no TCP
    keepalive; libpq's default one waits two hours): a `SELECT 1` without an answer notices it."""
    with _as_lost():
        try:
            async with asyncio.timeout(seconds):
                await connection.execute(text("SELECT 1"))
                await connection.commit()  # notifications wait for the transaction's end
        except TimeoutError:
            raise ConnectionLostError(f"no answer to SELECT 1 within {seconds:g} s") from None


@contextmanager
def _as_lost() -> Iterator[None]:
    """Each driver says "lost" its own way; the listener connects again after any of them."""
    try:
        yield
    except ConnectionLostError:
        raise
    except Exception as error:
        if not _is_lost(error):
            raise
        raise ConnectionLostError(str(error).strip().split("\n")[0]) from None


def _is_lost(error: BaseException) -> bool:
    if isinstance(error, DatabaseUnavailableError):
        return error.transient  # refused, timed out; not a wrong password or database
    if isinstance(error, DBAPIError):
        sqlstate = str(getattr(error.orig, "sqlstate", None))
        return error.connection_invalidated or sqlstate.startswith(("08", "57P"))
    return isinstance(
        error, OSError | asyncpg.ConnectionDoesNotExistError | psycopg.OperationalError
    )
