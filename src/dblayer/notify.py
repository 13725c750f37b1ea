"""LISTEN/NOTIFY: send in the caller's transaction, listen on a connection of one's own.

`notify` sends with `pg_notify()`, in the session's transaction: the server delivers it at that
transaction's commit, and never if it rolls back. `listen` holds a connection no pool can lend
to anyone else (a pooled connection's LISTEN is rolled back, or left behind, when it goes back),
yields what arrives, and when that connection is lost opens another and listens again. The
server keeps nothing for a channel nobody listens on: what was sent while the listener was away
is lost, which is why `on_listening` runs after every LISTEN (re-read the state there). Where
the two drivers differ is in `dblayer.notify_drivers`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from dblayer.engine import check_tls_files, classify_connect_failures, connect_args
from dblayer.notify_drivers import ConnectionLostError, Notification, listening
from dblayer.settings import Settings, SettingsError, get_settings

__all__ = ["ConnectionLostError", "Notification", "listen", "notify"]

logger = logging.getLogger(__name__)


# --8<-- [start:notify]
async def notify(session: AsyncSession, channel: str, payload: str = "") -> None:
    """Send `payload` on `channel` when the session's transaction commits (never if it rolls
    back). Both are bound parameters of `pg_notify()`: no quoting, nothing to inject."""
    await session.execute(select(func.pg_notify(channel, payload)))
    # --8<-- [end:notify]


# --8<-- [start:listen]
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
                async with listening(engine, channels, check_every, max_queued) as received:
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
    # --8<-- [end:listen]
