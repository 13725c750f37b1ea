"""Faults under load: the app served by uvicorn answers a steady stream of requests while the
primary restarts, its connections are terminated, or PgBouncer restarts. Answers are counted by
phase (a request that started in one phase and ended in another counts as "spanning"): a 503
while the database is away, never a 500, and every request answered 200 again within seconds of
its return."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
import uvicorn
from sqlalchemy import URL

from dblayer import prestart
from dblayer.api import create_app
from dblayer.embedded import EmbeddedPostgres, free_port
from dblayer.settings import Driver
from dblayer.testing import connect
from tests.apps import settings_for
from tests.databases import Server
from tests.pgbouncer import serve_pgbouncer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CLIENTS = 4  # concurrent clients, each sending one request after the other
RECOVERY = 3.0  # seconds after the database is back within which every request succeeds again
PATH = "/tasks?limit=5"


class Load:
    """A stream of GETs from CLIENTS clients, until the block ends; each answer counted under
    the phase its request started and ended in, else under "spanning" (a request without an
    answer counts as its exception's class name)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.phase = "before"
        self.counts: defaultdict[str, Counter[int | str]] = defaultdict(Counter)
        self._stop = asyncio.Event()

    async def _one_client(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            try:
                answer: int | str = (await self.client.get(PATH)).status_code
            except httpx.HTTPError as error:
                answer = type(error).__name__
            self.counts[phase if phase == self.phase else "spanning"][answer] += 1
            await asyncio.sleep(0.01)

    async def during(self, phase: str, seconds: float) -> None:
        self.phase = phase
        await asyncio.sleep(seconds)

    async def around(self, phase: str, step: Callable[[], Awaitable[object]]) -> None:
        self.phase = phase
        await step()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._one_client()) for _ in range(CLIENTS)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def served(url: URL, **values: object) -> AsyncIterator[Load]:
    """The app (its pool as documented, pre-ping on) served by uvicorn on a free port, with the
    load running against it."""
    app = create_app(settings_for(url, db_cursor_secret="x" * 32, **values))
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        while not (server.started or serving.done()):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{server.config.port}"
        async with (
            httpx.AsyncClient(base_url=base, timeout=20) as client,
            Load(client).running() as load,
        ):
            await load.during("before", 1.0)
            yield load
    finally:
        server.should_exit = True
        await serving


def assert_recovers(counts: dict[str, Counter[int | str]], away: list[str]) -> None:
    """200s before; while away, on the way back and across phases 200 or 503 only, never a 500
    or no answer; a 503 while it is down; then only 200s."""
    assert set(counts["before"]) == {200}, counts
    for phase in [*away, "spanning"]:
        assert set(counts[phase]) <= {200, 503}, (phase, counts)
    assert counts["down"][503] > 0, counts
    assert set(counts["after"]) == {200}, counts
    assert counts["after"][200] >= 10, counts


@pytest.fixture
def restartable(driver: Driver) -> Iterator[EmbeddedPostgres]:
    """A server of its own, migrated and seeded by pre-start: restarting the shared one would cut
    every other test's connections."""
    with EmbeddedPostgres() as server:
        with pytest.MonkeyPatch.context() as env:
            url = server.url(driver=driver)
            env.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
            assert prestart.main([]) == 0
        yield server


def test_the_primary_restarted_under_load(restartable: EmbeddedPostgres, driver: Driver) -> None:
    """Stopped: 503 (never 500) while it is down; started: every request 200 within RECOVERY."""
    log = str(restartable.directory / "server.log")

    async def scenario() -> dict[str, Counter[int | str]]:
        async with served(restartable.url(driver=driver)) as load:
            await load.around(
                "stopping", lambda: asyncio.to_thread(restartable._pg_ctl, "stop", "-m", "fast")
            )
            await load.during("down", 1.5)
            await load.around(
                "starting",
                lambda: asyncio.to_thread(restartable._pg_ctl, "start", "-w", "-l", log),
            )
            await load.during("back", RECOVERY)
            await load.during("after", 2.0)
            return load.counts

    counts = asyncio.run(scenario())
    assert set(counts["down"]) == {503}, counts
    assert_recovers(counts, ["stopping", "down", "starting", "back"])


def test_every_app_connection_terminated_under_load(
    server: Server, database_url: URL, driver: Driver
) -> None:
    """`pg_terminate_backend` on every connection of the app: pre-ping replaces them, and no
    request that starts after it fails."""

    def terminate() -> int:
        admin = server.admin_url
        with connect(admin.set(database="postgres")) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()",
                (database_url.database,),
            ).fetchall()
        return len(rows)

    async def scenario() -> tuple[int, dict[str, Counter[int | str]]]:
        async with served(database_url) as load:
            load.phase = "terminating"
            terminated = await asyncio.to_thread(terminate)
            await load.during("after", 2.0)
            return terminated, load.counts

    terminated, counts = asyncio.run(scenario())
    assert terminated >= 1
    assert set(counts["before"]) == {200}, counts
    for phase in ("terminating", "spanning"):  # a query on a connection as it is terminated
        assert set(counts[phase]) <= {200, 503}, counts
    assert set(counts["after"]) == {200}, counts  # zero failed requests after the terminations
    assert counts["after"][200] >= 10, counts


def test_pgbouncer_restarted_under_load(server: Server, database_url: URL) -> None:
    """PgBouncer stopped and started on the same port, the app behind it with
    `DB_EXTERNAL_POOLER=true`: 503 while it is down, 200 again within RECOVERY."""
    with serve_pgbouncer(server.admin_url) as bouncer:
        url = bouncer.url(database_url)

        async def scenario() -> dict[str, Counter[int | str]]:
            async with served(url, db_external_pooler=True) as load:
                await load.around("stopping", lambda: asyncio.to_thread(bouncer.stop))
                await load.during("down", 1.5)
                await load.around("starting", lambda: asyncio.to_thread(bouncer.start))
                await load.during("back", RECOVERY)
                await load.during("after", 2.0)
                return load.counts

        counts = asyncio.run(scenario())
    assert set(counts["down"]) == {503}, counts
    assert_recovers(counts, ["stopping", "down", "starting", "back"])
