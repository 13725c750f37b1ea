"""`dblayer.notify` on a real server, under both drivers (its code differs per driver): delivered at
the sender's commit and never after a rollback, nothing lost from many senders on separate
sessions at once, listening again after `pg_terminate_backend`, nothing left open when the
listener is cancelled, and no password in what it raises or logs."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.engine import DatabaseUnavailableError
from dblayer.notify import Notification, listen, notify
from dblayer.session import session_scope
from dblayer.settings import Settings, get_settings
from tests.apps import free_port

pytestmark = [pytest.mark.both_drivers, pytest.mark.timeout(60)]

Maker = async_sessionmaker[AsyncSession]
ROUNDS = 25
SENDERS = 8
EACH = 5

OTHERS = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
KILL_OTHERS = text(
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


def settings_for(url: URL) -> Settings:
    return get_settings(database_url=url.render_as_string(hide_password=False))


class Listener:
    """`listen` iterated by a task of its own into a queue, as an app's background task would."""

    def __init__(self, url: URL, channels: list[str]) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()
        self.listening = asyncio.Event()
        self.times_listening = 0

        async def on_listening() -> None:
            self.times_listening += 1
            self.listening.set()

        async def run() -> None:
            async with aclosing(
                listen(channels, settings_for(url), on_listening=on_listening, backoff=0.01)
            ) as notifications:
                async for notification in notifications:
                    self.queue.put_nowait(notification)

        self.task = asyncio.create_task(run())

    async def started(self) -> Listener:
        await asyncio.wait_for(self.listening.wait(), 10)
        return self

    async def next(self, seconds: float = 10) -> Notification:
        return await asyncio.wait_for(self.queue.get(), seconds)

    async def nothing_within(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return self.queue.empty()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def listener(database_url: URL) -> AsyncIterator[Listener]:
    listener = await Listener(database_url, ["jobs"]).started()
    yield listener
    await listener.stop()


async def send(sessionmaker: Maker, channel: str, payload: str) -> None:
    async with session_scope(sessionmaker) as session:
        await notify(session, channel, payload)


async def test_delivered_at_commit_and_never_after_a_rollback(
    sessionmaker: Maker, listener: Listener
) -> None:
    async with sessionmaker() as session:
        await notify(session, "jobs", "one")
        await session.flush()
        assert await listener.nothing_within(0.3)  # sent, not committed
        await session.commit()
    assert await listener.next() == Notification("jobs", "one")
    async with sessionmaker() as session:
        await notify(session, "jobs", "rolled back")
        await session.rollback()
    await send(sessionmaker, "jobs", "two")
    assert await listener.next() == Notification("jobs", "two")
    assert await listener.nothing_within(0.1)


async def test_channels_are_names_as_given(database_url: URL, sessionmaker: Maker) -> None:
    """Quoted: `Jobs` is not `jobs`, and quotes in a name are part of it."""
    names = ["jobs", "Jobs", 'a "quoted"; name']
    listener = await Listener(database_url, names).started()
    try:
        for name in reversed(names):
            await send(sessionmaker, name, f"for {name}")
        received = [await listener.next() for _ in names]
        assert received == [Notification(name, f"for {name}") for name in reversed(names)]
        await send(sessionmaker, "JOBS", "nobody listens")
        assert await listener.nothing_within(0.2)
    finally:
        await listener.stop()


async def test_nothing_lost_from_concurrent_senders(
    sessionmaker: Maker, listener: Listener
) -> None:
    """Many sessions send at once, each several transactions; every notification arrives once,
    and each sender's in the order it committed them."""

    async def sender(start: asyncio.Event, round_: int, number: int) -> None:
        await start.wait()
        for sent in range(EACH):
            await send(sessionmaker, "jobs", f"{round_} {number} {sent}")

    for round_ in range(ROUNDS):
        start = asyncio.Event()
        senders = [asyncio.create_task(sender(start, round_, n)) for n in range(SENDERS)]
        start.set()
        await asyncio.gather(*senders)
        received = [(await listener.next()).payload for _ in range(SENDERS * EACH)]
        assert Counter(received) == Counter(
            f"{round_} {number} {sent}" for number in range(SENDERS) for sent in range(EACH)
        )
        for number in range(SENDERS):
            mine = [p for p in received if p.startswith(f"{round_} {number} ")]
            assert mine == [f"{round_} {number} {sent}" for sent in range(EACH)]
    assert await listener.nothing_within(0.1)


async def test_listens_again_after_its_connection_is_terminated(
    sessionmaker: Maker,
    listener: Listener,
    database_url: URL,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "dblayer.notify")
    for round_ in range(3):
        listener.listening.clear()
        async with session_scope(sessionmaker) as session:
            assert await session.scalar(KILL_OTHERS) == 1  # the listener's connection
        # Lost if sent before it listens again, which is at once here (it was waiting).
        await send(sessionmaker, "jobs", f"meanwhile {round_}")
        await asyncio.wait_for(listener.listening.wait(), 10)
        await send(sessionmaker, "jobs", f"back {round_}")
        received = [(await listener.next()).payload]
        if received[0] != f"back {round_}":
            received.append((await listener.next()).payload)
        assert received in ([f"back {round_}"], [f"meanwhile {round_}", f"back {round_}"])
    assert listener.times_listening == 4
    lost = [r.getMessage() for r in caplog.records if "listening again" in r.getMessage()]
    assert len(lost) == 3
    assert str(database_url.password) not in caplog.text


async def test_cancelled_it_leaves_no_connection_open(
    sessionmaker: Maker, listener: Listener
) -> None:
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(OTHERS) == 1
    await listener.stop()
    assert listener.task.cancelled()
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(OTHERS) == 0


async def test_a_name_that_cannot_be_listened_on_is_raised_and_closed(
    database_url: URL, sessionmaker: Maker
) -> None:
    # asyncpg sends it and the server refuses the message; libpq cuts the statement at the NUL
    with pytest.raises(Exception, match=r"insufficient data|unterminated quoted identifier"):
        async with aclosing(listen(["bad\x00name"], settings_for(database_url))) as it:
            await anext(it)
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(OTHERS) == 0


async def test_without_on_listening(database_url: URL, sessionmaker: Maker) -> None:
    """Sent until it arrives: without `on_listening`, nothing says when it listens."""
    async with aclosing(listen(["jobs"], settings_for(database_url))) as notifications:
        first = asyncio.ensure_future(anext(notifications))
        while not first.done():
            await send(sessionmaker, "jobs", "ping")
            await asyncio.wait([first], timeout=0.05)
        assert first.result() == Notification("jobs", "ping")


async def test_a_setting_that_cannot_work_is_raised_at_once(database_url: URL) -> None:
    settings = settings_for(database_url.set(database="no_such_db"))
    with pytest.raises(DatabaseUnavailableError) as raised:
        async with aclosing(listen(["jobs"], settings)) as notifications:
            await anext(notifications)
    assert not raised.value.transient
    assert str(database_url.password) not in str(raised.value)


async def test_an_unreachable_server_is_tried_again_with_waits(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "dblayer.notify")
    settings = settings_for(database_url.set(port=free_port()))
    retries = RetriesLogged(3)
    logging.getLogger("dblayer.notify").addHandler(retries)
    try:
        async with aclosing(listen(["jobs"], settings, backoff=0.01, max_backoff=0.02)) as it:
            attempt = asyncio.ensure_future(anext(it))
            await asyncio.wait_for(retries.enough.wait(), 10)
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
    finally:
        logging.getLogger("dblayer.notify").removeHandler(retries)
    assert "connection refused" in caplog.text
    assert str(database_url.password) not in caplog.text


class RetriesLogged(logging.Handler):
    """Sets `enough` once `listen` has logged this many tries to connect again."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.left = count
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "connecting again in" in record.getMessage():
            self.left -= 1
            if self.left <= 0:
                self.enough.set()
