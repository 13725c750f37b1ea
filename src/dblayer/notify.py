"""LISTEN/NOTIFY: send in the caller's transaction, listen on a connection of one's own.

`notify` sends with `pg_notify()`, in the session's transaction: the server delivers it at that
transaction's commit, and never if it rolls back. `listen` holds a connection no pool can lend
to anyone else (a pooled connection's LISTEN is rolled back, or left behind, when it goes back),
yields what arrives, and when that connection is lost opens another and listens again. The
server keeps nothing for a channel nobody listens on: what was sent while the listener was away
is lost, which is why `on_listening` runs after every LISTEN (re-read the state there).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import asyncpg
import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from dblayer.engine import (
    DatabaseUnavailableError,
    check_tls_files,
    classify_connect_failures,
    connect_args,
)
from dblayer.settings import Settings, SettingsError, get_settings

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
    pid: int = field(default=0, compare=False, repr=False)  # the sender's server process


class ConnectionLostError(ConnectionError):
    """The listener's connection is lost, or fell behind: what is sent until it listens again
    does not reach it."""


async def listen(
    channels: Sequence[str],
    settings: Settings | None = None,
    *,
    on_listening: Callable[[], Awaitable[None]] | None = None,
    backoff: float = 0.1,
    max_backoff: float = 10.0,
    check_every: float = 30.0,
    max_queued: int = 10_000,
) -> AsyncGenerator[Notification, None]:
    """Yield the notifications sent on `channels`, on a connection of the listener's own.

    Each time it listens, first time included, it awaits `on_listening()` before yielding
    anything: the place to re-read what the notifications are about (an exception there ends
    the listener). A lost connection is noticed when the listener is next iterated; it then
    connects again after a random wait below `backoff * 2**(n - 1)` seconds, n the losses in a
    row (a connection that lasted over `max_backoff` starts the count again), capped at
    `max_backoff`. A server gone without a word is noticed by a `SELECT 1` after `check_every`
    seconds: no answer within as many seconds is a loss. A setting that cannot work (a wrong
    password, PgBouncer's URL) is raised at once. Close it with `contextlib.aclosing`."""
    channels = _checked(channels)
    settings = settings or get_settings()
    if settings.db_external_pooler:
        # PgBouncer's LISTEN stays on a server connection the listener no longer has
        raise SettingsError(
            "DB_EXTERNAL_POOLER: LISTEN needs the server's own URL, not PgBouncer's"
        )
    engine = _engine(settings)
    clock = asyncio.get_running_loop().time
    losses = 0
    try:
        while True:
            listened_at = None
            try:
                async with _listening(engine, channels, check_every, max_queued) as received:
                    listened_at = clock()
                    if on_listening is not None:
                        await on_listening()
                    async for notification in received:  # pragma: no branch - ends by raising
                        yield notification
            except ConnectionLostError as error:
                lasted = listened_at is not None and clock() - listened_at > max_backoff
                losses = 1 if lasted else losses + 1
                # full jitter: listeners that lost the same server do not come back in step
                cap = min(max_backoff, backoff * 2 ** (losses - 1))
                wait = random.uniform(0, cap)  # noqa: S311 - not a secret
                logger.warning(
                    "listener: %s; connecting again in %.3f s (try %d)", error, wait, losses
                )
                await asyncio.sleep(wait)
    finally:
        await asyncio.shield(engine.dispose())


def _checked(channels: Sequence[str]) -> Sequence[str]:
    """LISTEN would cut a longer name to 63 bytes (where `pg_notify` refuses it), a str would be
    listened on letter by letter, and no channel at all would wait forever."""
    if isinstance(channels, str):
        raise ValueError(f"listen() takes a list of channel names, not a str: [{channels!r}]")
    if not channels:
        raise ValueError("listen() was given no channel to listen on")
    for channel in channels:
        if not channel:
            raise ValueError("an empty channel name cannot be listened on")
        if len(channel.encode()) > 63:
            raise ValueError(f"a channel name is at most 63 bytes, not {len(channel.encode())}")
    return channels


def _engine(settings: Settings) -> AsyncEngine:
    """The app's URL, TLS and timeouts, but no pool: the listener's one connection is closed,
    with its LISTEN, when the listener ends or loses it."""
    check_tls_files(settings)
    engine = create_async_engine(
        settings.url,
        poolclass=NullPool,
        hide_parameters=settings.db_hide_parameters,
        connect_args=connect_args(settings),
    )
    classify_connect_failures(engine)
    return engine


@asynccontextmanager
async def _listening(
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
    """A server gone without a word (a failover, a partition) sends nothing, and the kernel's
    keepalive would notice after hours: a `SELECT 1` without an answer notices it."""
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
    # --8<-- [end:listen]
