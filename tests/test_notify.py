"""`dblayer.notify` on a real server, under both drivers (its code differs per driver): delivered at
the sender's commit and never after a rollback, nothing lost from many senders on separate
sessions at once, listening again after `pg_terminate_backend`, nothing left open when the
listener is cancelled, and no password in what it raises or logs."""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
from packaging.requirements import Requirement
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.embedded import free_port
from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.notify import Notification, listen, notify
from dblayer.pgbouncer import PgBouncer
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import Settings, SettingsError, get_settings
from tests.paths import ROOT
from tests.proxy import proxy

# The drivers' own paths (notify_drivers.py) are the tests marked both_drivers.
pytestmark = [pytest.mark.timeout(60)]

Maker = async_sessionmaker[AsyncSession]
ROUNDS = 25
SENDERS = 8
EACH = 5

OTHERS = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND backend_type = 'client backend'"
    " AND pid <> pg_backend_pid()"
)
KILL_LISTENER = text(  # all but the sender's
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND backend_type = 'client backend'"
    " AND pid NOT IN (pg_backend_pid(), :sender)"
)
KILL_OTHERS = text(
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND backend_type = 'client backend'"
    " AND pid <> pg_backend_pid()"
)


def settings_for(url: URL) -> Settings:
    return get_settings(database_url=url.render_as_string(hide_password=False))


class Listener:
    """`listen` iterated by a task of its own into a queue, as an app's background task would."""

    def __init__(self, url: URL, channels: list[str], **options: Any) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()
        self.listening = asyncio.Event()
        self.times_listening = 0
        options.setdefault("backoff", 0.01)

        async def on_listening() -> None:
            self.times_listening += 1
            self.listening.set()

        async def run() -> None:
            async with aclosing(
                listen(channels, settings_for(url), on_listening=on_listening, **options)
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


async def others(sessionmaker: Maker) -> int:
    async with session_scope(sessionmaker) as session:
        return int(await session.scalar(OTHERS) or 0)


async def until_others(sessionmaker: Maker, count: int, seconds: float = 10) -> None:
    """Polls until `count` other connections are open: a closed one leaves `pg_stat_activity`
    when its server process has ended, shortly after the client closed it."""
    async with asyncio.timeout(seconds):
        while await others(sessionmaker) != count:  # noqa: ASYNC110 - the server's state, polled
            await asyncio.sleep(0.02)


async def until(condition: Any, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polled, under a deadline
            await asyncio.sleep(0.01)


def logged(caplog: pytest.LogCaptureFixture, pattern: str) -> list[re.Match[str]]:
    return [m for r in caplog.records if (m := re.search(pattern, r.getMessage()))]


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


@pytest.mark.both_drivers  # each driver's own path in notify_drivers.py
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
    assert len(logged(caplog, "connecting again in")) == 3
    assert str(database_url.password) not in caplog.text


async def test_cancelled_it_leaves_no_connection_open(
    sessionmaker: Maker, listener: Listener
) -> None:
    async with session_scope(sessionmaker) as session:
        assert await session.scalar(OTHERS) == 1
    await listener.stop()
    assert listener.task.cancelled()
    await until_others(sessionmaker, 0)


async def test_a_name_that_cannot_be_listened_on_is_raised_and_closed(
    database_url: URL, sessionmaker: Maker
) -> None:
    # asyncpg sends it and the server refuses the message; libpq cuts the statement at the NUL
    with pytest.raises(Exception, match=r"insufficient data|unterminated quoted identifier"):
        async with aclosing(listen(["bad\x00name"], settings_for(database_url))) as it:
            await anext(it)
    await until_others(sessionmaker, 0)


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
            await asyncio.wait_for(anext(notifications), 10)
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
    waits = [float(m[1]) for m in logged(caplog, r"connecting again in ([\d.]+) s")]
    assert len(waits) >= 3
    assert all(0 <= wait <= 0.02 for wait in waits)
    assert any(waits)


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


@pytest.mark.parametrize("cut_on", [b"LISTEN", b"COMMIT"])
async def test_a_connection_lost_while_it_starts_listening_is_tried_again(
    database_url: URL, sessionmaker: Maker, caplog: pytest.LogCaptureFixture, cut_on: bytes
) -> None:
    """Cut by the network during its LISTEN, or the COMMIT that makes it take effect: the driver
    raises its own kind of error there (asyncpg's ConnectionDoesNotExistError, psycopg's
    OperationalError), and `listen` connects again as after any lost connection."""
    caplog.set_level(logging.WARNING, "dblayer.notify")
    async with proxy(database_url, cut_on=cut_on, cuts=2) as cutting:
        listener = await Listener(cutting.url(), ["jobs"]).started()
        try:
            await send(sessionmaker, "jobs", "heard")
            assert await listener.next() == Notification("jobs", "heard")
            assert listener.times_listening == 1
        finally:
            await listener.stop()
    assert [m[1] for m in logged(caplog, r"\(try (\d+)\)")] == ["1", "2"]


async def test_a_server_that_vanishes_without_a_word_is_noticed(
    database_url: URL, sessionmaker: Maker
) -> None:
    """No FIN, no RST (a failover, a partition): the listener's `SELECT 1` gets no answer within
    `check_every` seconds, and it connects again (to the server that answers now)."""
    async with proxy(database_url) as network:
        listener = await Listener(network.url(), ["jobs"], check_every=0.5).started()
        try:
            network.vanish()
            async with session_scope(sessionmaker) as session:
                assert await session.scalar(KILL_OTHERS) == 1  # the server forgets it
            await until(lambda: listener.times_listening == 2)
            await send(sessionmaker, "jobs", "after")
            assert await listener.next() == Notification("jobs", "after")
        finally:
            await listener.stop()


@pytest.mark.both_drivers  # each driver's own path in notify_drivers.py
async def test_a_quiet_listener_checks_its_connection_and_stays(
    database_url: URL, sessionmaker: Maker
) -> None:
    """The check on a live connection passes (here twice in each quiet 1.1 s), and notifications
    sent around it all arrive. (A check not answered within `check_every` counts as a lost
    connection: half a second, for a busy machine.)"""
    listener = await Listener(database_url, ["jobs"], check_every=0.5).started()
    try:
        for number in range(3):
            await send(sessionmaker, "jobs", str(number))
            await asyncio.sleep(1.1)  # quiet: the listener checks its connection
        assert [(await listener.next()).payload for _ in range(3)] == ["0", "1", "2"]
        assert listener.times_listening == 1
    finally:
        await listener.stop()


async def test_behind_pgbouncer_it_refuses_the_poolers_url(
    pgbouncer: PgBouncer, database_url: URL, sessionmaker: Maker
) -> None:
    """Through PgBouncer in transaction mode the LISTEN stays on a server connection the listener
    no longer has: nothing arrives, silently. So `listen` refuses settings that say a pooler is
    in between (DB_EXTERNAL_POOLER); settings with the server's own URL work."""
    through = pgbouncer.url(database_url)
    settings = get_settings(
        database_url=through.render_as_string(hide_password=False), db_external_pooler=True
    )
    with pytest.raises(SettingsError, match="DB_EXTERNAL_POOLER") as raised:
        async with aclosing(listen(["jobs"], settings)) as notifications:
            await asyncio.wait_for(anext(notifications), 10)
    assert str(database_url.password) not in str(raised.value)
    listener = await Listener(database_url, ["jobs"]).started()
    try:
        await send(sessionmaker, "jobs", "direct")
        assert await listener.next() == Notification("jobs", "direct")
    finally:
        await listener.stop()


@pytest.mark.both_drivers  # each driver's own path in notify_drivers.py
async def test_a_slow_reader_holds_a_bounded_number(
    database_url: URL, sessionmaker: Maker, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    """asyncpg reads every notification off the socket as it comes: past `max_queued` unread,
    `listen` drops the rest and, once the reader has taken what it holds, listens again
    (`on_listening` re-reads). psycopg reads only when asked: the rest waits in the server's
    notification queue (`pg_notification_queue_usage()`), for every listener's server."""
    caplog.set_level(logging.WARNING, "dblayer.notify")
    times = 0
    listening = asyncio.Event()

    async def on_listening() -> None:
        nonlocal times
        times += 1
        listening.set()

    settings = settings_for(database_url)
    many = text(  # 24 MB, more than the sockets' buffers hold
        "SELECT count(pg_notify('jobs', n || ' ' || repeat('x', 7900)))"
        " FROM generate_series(0, 2999) AS n"
    )
    async with aclosing(
        listen(["jobs"], settings, on_listening=on_listening, max_queued=10)
    ) as notifications:
        first = asyncio.ensure_future(anext(notifications))
        await asyncio.wait_for(listening.wait(), 10)
        listening.clear()
        async with session_scope(sessionmaker) as session:
            await session.execute(many)
        if driver == "asyncpg":
            await until(lambda: bool(logged(caplog, "10 notifications unread")))
            payloads = [(await asyncio.wait_for(first, 10)).payload]

            async def read_on() -> None:
                async for notification in notifications:  # pragma: no branch - returns
                    payloads.append(notification.payload)
                    if notification.payload == "after":
                        return

            reading = asyncio.ensure_future(read_on())
            await asyncio.wait_for(listening.wait(), 10)  # once it has read what it held
            await send(sessionmaker, "jobs", "after")
            await asyncio.wait_for(reading, 10)
            numbers = [int(payload.split()[0]) for payload in payloads[:-1]]
            assert numbers == list(range(len(numbers)))
            assert len(numbers) <= 11  # the one it was waiting for, and the 10 it held
            assert payloads[-1] == "after"
            assert times == 2
        else:
            assert (await asyncio.wait_for(first, 10)).payload.startswith("0 ")
            async with session_scope(sessionmaker) as session:
                usage = text("SELECT pg_notification_queue_usage()")
                assert await session.scalar(usage) > 0
            for number in range(1, 3000):
                received = await asyncio.wait_for(anext(notifications), 10)
                assert received.payload.startswith(f"{number} ")
            assert times == 1


async def test_an_idle_session_timeout_does_not_end_it(
    database_url: URL, engine: Any, sessionmaker: Maker
) -> None:
    """A database's idle_session_timeout would end the listener's idle connection over and over
    (it reconnected 9 times in 3 s at 300 ms): the listener's connection turns it off."""
    async with engine.connect() as connection:
        alter = f'ALTER DATABASE "{database_url.database}" SET idle_session_timeout = 200'
        await connection.execute(text(alter))
        await connection.commit()
    listener = await Listener(database_url, ["jobs"]).started()
    try:
        await asyncio.sleep(1)  # five timeouts' worth of idleness
        assert listener.times_listening == 1
    finally:
        await listener.stop()


async def test_waits_grow_until_a_connection_lasts(
    database_url: URL, sessionmaker: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections that die as soon as they listen count as failures in a row (the waits grow);
    one that lasted longer than `max_backoff` starts the count again."""
    caplog.set_level(logging.WARNING, "dblayer.notify")
    listener = await Listener(database_url, ["jobs"], backoff=0.005, max_backoff=1).started()
    try:
        for _ in range(4):
            listener.listening.clear()
            async with session_scope(sessionmaker) as session:
                assert await session.scalar(KILL_OTHERS) == 1
            await asyncio.wait_for(listener.listening.wait(), 10)
        await asyncio.sleep(1.2)  # this connection lasts
        listener.listening.clear()
        async with session_scope(sessionmaker) as session:
            assert await session.scalar(KILL_OTHERS) == 1
        await asyncio.wait_for(listener.listening.wait(), 10)
    finally:
        await listener.stop()
    assert [m[1] for m in logged(caplog, r"\(try (\d+)\)")] == ["1", "2", "3", "4", "1"]


async def test_nothing_committed_after_on_listening_starts_is_lost(
    database_url: URL, sessionmaker: Maker
) -> None:
    """A sender commits numbered notifications without pause, on a connection of its own, while
    the listener's connection is terminated again and again: each time `on_listening` has begun,
    every number sent after that moment arrives, with no gap."""
    settings = get_settings(
        database_url=database_url.render_as_string(hide_password=False),
        db_pool_size=1,
        db_max_overflow=0,
    )
    sender_engine = create_engine(settings)
    in_flight = 0
    sessions: list[tuple[int, list[int]]] = []  # (in flight as it listened, received)

    async def sender() -> None:
        nonlocal in_flight
        senders = create_sessionmaker(sender_engine)
        while True:
            await send(senders, "numbers", str(in_flight))
            in_flight += 1

    async def on_listening() -> None:
        sessions.append((in_flight, []))

    sending = asyncio.create_task(sender())
    killed: set[int] = set()
    try:
        async with aclosing(
            listen(
                ["numbers"],
                settings_for(database_url),
                on_listening=on_listening,
                backoff=0.01,
                max_backoff=0.05,  # connections lost in a row: the waits stop growing there
            )
        ) as notifications:
            async for notification in notifications:  # pragma: no branch - ends by break
                mark, received = sessions[-1]
                received.append(int(notification.payload))
                if len(sessions) > ROUNDS:
                    break
                if len(sessions) not in killed and sum(n > mark for n in received) >= 3:
                    killed.add(len(sessions))
                    async with session_scope(sessionmaker) as session:
                        await session.execute(KILL_LISTENER, {"sender": notification.pid})
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await sender_engine.dispose()
    for mark, received in sessions:
        after = [n for n in received if n > mark]
        assert after == list(range(mark + 1, mark + 1 + len(after)))


@pytest.mark.parametrize(
    ("channels", "error"),
    [
        ("jobs", "a list of channel names, not a str"),
        ([], "no channel"),
        (["j" * 64], "at most 63 bytes, not 64"),
        ([""], "an empty channel name"),
    ],
)
async def test_channels_that_cannot_be_listened_on_are_refused(
    database_url: URL, channels: Any, error: str
) -> None:
    """LISTEN would cut a longer name to 63 bytes, where pg_notify refuses it; a str would be
    listened on letter by letter, and no channel would wait forever."""
    with pytest.raises(ValueError, match=error):
        async with aclosing(listen(channels, settings_for(database_url))) as notifications:
            await asyncio.wait_for(anext(notifications), 10)


async def test_an_error_in_on_listening_ends_it(database_url: URL, sessionmaker: Maker) -> None:
    async def on_listening() -> None:
        raise LookupError("the state could not be read")

    with pytest.raises(LookupError):
        async with aclosing(
            listen(["jobs"], settings_for(database_url), on_listening=on_listening)
        ) as notifications:
            await asyncio.wait_for(anext(notifications), 10)
    await until_others(sessionmaker, 0)


async def test_leaving_the_loop_closes_it(database_url: URL, sessionmaker: Maker) -> None:
    listening = asyncio.Event()

    async def on_listening() -> None:
        listening.set()

    async with aclosing(
        listen(["jobs"], settings_for(database_url), on_listening=on_listening)
    ) as notifications:
        waiting = asyncio.ensure_future(anext(notifications))
        await asyncio.wait_for(listening.wait(), 10)
        await send(sessionmaker, "jobs", "one")
        await send(sessionmaker, "jobs", "two")
        assert await asyncio.wait_for(waiting, 10) == Notification("jobs", "one")
        async for notification in notifications:  # pragma: no branch - left at once
            assert notification == Notification("jobs", "two")
            break
        await until_others(sessionmaker, 1)  # still open until aclosing closes it
    await until_others(sessionmaker, 0)


def test_psycopg_is_one_that_keeps_notifications_read_between_notifies() -> None:
    """Before 3.2.4 psycopg dropped notifications that arrived while `notifies()` was not running
    (psycopg#962, fixed by #975): the listener's check runs between two `notifies()`."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    psycopg = next(
        Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("psycopg")
    )
    assert not psycopg.specifier.contains("3.2.3")
    assert psycopg.specifier.contains("3.2.4")
