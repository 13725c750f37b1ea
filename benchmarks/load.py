"""The reference app under load: served by uvicorn, driven over HTTP, in one run.

Run with `make bench`. Uses `DATABASE_URL` (a superuser's) when set, else starts an embedded
PostgreSQL. Creates a database, runs pre-start (migrate, seed), then serves the app three times,
each in its own uvicorn process on 127.0.0.1: with the documented pool (the settings' defaults),
with `NullPool` (`DB_EXTERNAL_POOLER=true`, straight to the server) and through PgBouncer in
transaction mode (`DB_EXTERNAL_POOLER=true`; left out, with a line, where it is not installed).

The load generator is aiohttp's asyncio client: `clients` tasks, each with its own connection,
send `GET /tasks?limit=20` until REQUESTS have been sent; a point also stops at POINT_TIMEOUT
seconds. Locust would do the same, but runs on gevent (which does not mix with the asyncio app and
engine of this project) and is bounded by time, not by a count of requests. httpx's client (which
the tests use) was tried first: at 64 clients it spent more CPU than the app it drove, so the rows
measured the client; the share of a CPU the client used is printed under the table.
Writes docs/.bench/load.md, which docs/scaling.md includes; prints the same table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version

import aiohttp
import httpx
import psycopg
from sqlalchemy import URL

from benchmarks.recording import record
from dblayer.embedded import free_port
from dblayer.pgbouncer import NOT_INSTALLED, PgBouncer, PgBouncerError, find_pgbouncer, for_server
from dblayer.settings import get_settings

CLIENTS = (8, 32, 64)
REQUESTS = 1000  # per point (one row, one number of clients)
WARMUP = 100  # requests before each row's points, not counted
POINT_TIMEOUT = 60.0  # seconds: a point that takes longer stops and says so
STATS_DELAY = 1.2  # seconds: see sessions()
REQUEST_TIMEOUT = 40.0  # longer than the pool's 30 s timeout: its 503 is seen, not ours
DATABASE = "dblayer_load"
PATH = "/tasks?limit=20"
TARGET = 3.0  # pooled / NullPool at 32 clients, aimed for
COMMAND = "make bench (python -m benchmarks.load)"


@dataclass
class Point:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer (a timeout, a reset)
    opened: int = 0  # connections the server accepted for the database during the point
    client_cpu: float = 0.0  # CPU seconds the load generator (this process) spent on the point
    stopped: bool = False  # POINT_TIMEOUT reached

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[p - 1] if self.latencies else 0.0

    @property
    def failures(self) -> Counter[str]:
        """The non-200 answers by status, and the requests without one by exception."""
        failed = Counter({str(code): n for code, n in self.statuses.items() if code != 200})
        return failed + self.errors

    @property
    def failed(self) -> int:
        return self.failures.total()

    def describe_failures(self) -> str:
        return ", ".join(f"{n} x {what}" for what, n in sorted(self.failures.items())) or "0"


async def drive(base: str, clients: int, requests: int) -> Point:
    """`requests` GETs from `clients` concurrent clients; latencies of the answered ones."""
    point = Point(clients)
    left = iter(range(requests))
    # One keep-alive connection per client: the connector's limit is the number of clients.
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:

        async def one_client() -> None:
            for _ in left:  # shared: together the clients send `requests` in all
                started = time.perf_counter()
                try:
                    async with client.get(PATH) as response:
                        await response.read()
                except (aiohttp.ClientError, TimeoutError) as error:
                    point.errors[type(error).__name__] += 1
                    continue
                point.statuses[response.status] += 1
                point.latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        try:
            async with asyncio.timeout(POINT_TIMEOUT):
                await asyncio.gather(*(one_client() for _ in range(clients)))
        except TimeoutError:
            point.stopped = True
        point.seconds = time.perf_counter() - started
    return point


@contextlib.contextmanager
def served(env: dict[str, str]) -> Iterator[str]:
    """The app in its own uvicorn process (one worker) with `env`; its base URL once ready."""
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - this Python, uvicorn
        [
            sys.executable,
            "-m",
            "uvicorn",
            "dblayer.api:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            # A client of a saturated machine may take seconds to send its next request: keep
            # its connection (uvicorn's default closes it after 5 s idle, racing that request).
            "--timeout-keep-alive",
            "60",
        ],
        env={**os.environ, "DB_CURSOR_SECRET": secrets.token_urlsafe(32), **env},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with status {process.returncode}")
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not answer /ready in 30 s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - uvicorn stops on SIGTERM
            process.kill()
            process.wait()


def admin_connection(admin: URL) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=admin.host,
        port=admin.port,
        user=admin.username,
        password=admin.password if isinstance(admin.password, str) else None,
        dbname=admin.database or "postgres",
        autocommit=True,
    )


def sessions(admin: URL) -> int:
    """Connections the server has accepted for the database so far (`pg_stat_database`). A
    backend reports its connection at its first idle moment, at most a second later: wait that."""
    time.sleep(STATS_DELAY)
    with admin_connection(admin) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
    assert row is not None
    opened = row[0]
    assert isinstance(opened, int)
    return opened


def measure_rows(admin: URL, configurations: dict[str, dict[str, str]]) -> dict[str, list[Point]]:
    """Every configuration served at once (idle but one); the points taken in turn, each number
    of clients across the configurations: a busy moment of the machine is shared out."""
    with contextlib.ExitStack() as stack:
        bases = {name: stack.enter_context(served(env)) for name, env in configurations.items()}
        for base in bases.values():
            asyncio.run(drive(base, max(CLIENTS), WARMUP))
        rows: dict[str, list[Point]] = {name: [] for name in configurations}
        for clients in CLIENTS:
            for name, base in bases.items():
                before = sessions(admin)
                cpu = time.process_time()
                point = asyncio.run(drive(base, clients, REQUESTS))
                point.client_cpu = time.process_time() - cpu
                point.opened = sessions(admin) - before
                rows[name].append(point)
        return rows


def prepare(admin: URL) -> tuple[URL, str]:
    """A fresh database on the server of `admin`, migrated and seeded by pre-start."""
    with admin_connection(admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
        server = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
    url = admin.set(drivername="postgresql+asyncpg", database=DATABASE)
    subprocess.run(
        [sys.executable, "-m", "dblayer.prestart"],
        env={**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return url, server


def table(rows: dict[str, list[Point] | str], server: str, pgbouncer: str) -> str:
    lines = [
        "| configuration | clients | requests/s | p50 | p99 | connections opened "
        "| non-200 / no answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, points in rows.items():
        if isinstance(points, str):
            lines.append(f"| {name} | | | | | | {points} |")
            continue
        for point in points:
            stopped = f" (stopped at {POINT_TIMEOUT:.0f} s)" if point.stopped else ""
            lines.append(
                f"| {name} | {point.clients} | {point.throughput:.0f} "
                f"| {point.percentile(50) * 1e3:.1f} ms | {point.percentile(99) * 1e3:.1f} ms "
                f"| {point.opened} | {point.describe_failures()}{stopped} |"
            )
    lines.append("")
    pooled, unpooled = rows["documented pool"], rows["NullPool"]
    assert not isinstance(pooled, str)
    assert not isinstance(unpooled, str)
    at = CLIENTS.index(32)
    ratio = pooled[at].throughput / unpooled[at].throughput
    timeouts = sum(p.statuses[503] for p in pooled)
    failed = sum(p.failed for p in pooled)
    lines.append(
        f"At 32 clients the documented pool serves **{ratio:.1f}x** the requests per second of "
        f"`NullPool` ({'at or above' if ratio >= TARGET else 'below'} the {TARGET:.0f}x aimed "
        f"for). At the documented sizing: {timeouts} pool timeouts (503) and "
        f"{failed - timeouts} other non-200 answers or unanswered requests, over "
        f"{len(CLIENTS) * REQUESTS} requests. A failure is shown as count x status (or the "
        f"exception of a request that got no answer). Connections opened: how many the server "
        f"accepted for the app's database during the point (`pg_stat_database.sessions`), "
        f"PgBouncer's included."
    )
    measured = [p for points in rows.values() if not isinstance(points, str) for p in points]
    busiest = max(p.client_cpu / p.seconds for p in measured if p.seconds)
    settings = get_settings()
    lines.append("")
    lines.append(
        f"{REQUESTS} `GET {PATH}` per point (after {WARMUP} not counted), the configurations' "
        f"points taken in turn, from one asyncio aiohttp {version('aiohttp')} client process "
        f"(at most {busiest:.0%} of one CPU during any point: the load generator is not what "
        f"limits the rows), each "
        f"client on its own keep-alive connection; each configuration's app in one uvicorn "
        f"{version('uvicorn')} worker, asyncpg {version('asyncpg')}, "
        f"SQLAlchemy {version('sqlalchemy')}. Documented pool: pool_size "
        f"{settings.db_pool_size}, max_overflow {settings.db_max_overflow}, pool_timeout "
        f"{settings.db_pool_timeout:.0f} s, pre-ping on. NullPool and PgBouncer: "
        f"`DB_EXTERNAL_POOLER=true`. PostgreSQL {server} and {pgbouncer} (transaction mode, "
        f"default_pool_size 20) on 127.0.0.1 with password authentication (SCRAM), the same "
        f"machine as the app and the client: {os.cpu_count()} CPUs ({platform.machine()}), "
        f"Python {platform.python_version()}. Recorded by `{COMMAND}`."
    )
    return "\n".join(lines) + "\n"


def pgbouncer_version() -> str:
    output = subprocess.run(  # noqa: S603 - the pgbouncer program
        [str(find_pgbouncer()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return output.splitlines()[0].strip()  # "PgBouncer 1.18.0"


async def measure(admin: URL) -> str:
    url, server = await asyncio.to_thread(prepare, admin)
    direct = url.render_as_string(hide_password=False)
    configurations = {
        "documented pool": {"DATABASE_URL": direct},
        "NullPool": {"DATABASE_URL": direct, "DB_EXTERNAL_POOLER": "true"},
    }
    try:
        bouncer: PgBouncer | None = for_server(admin)
        pgbouncer = pgbouncer_version()
    except PgBouncerError:
        bouncer, pgbouncer = None, "no PgBouncer"
    with bouncer or contextlib.nullcontext():
        if bouncer is not None:
            through = bouncer.url(url).render_as_string(hide_password=False)
            configurations["PgBouncer"] = {"DATABASE_URL": through, "DB_EXTERNAL_POOLER": "true"}
        measured = await asyncio.to_thread(measure_rows, admin, configurations)
    rows: dict[str, list[Point] | str] = dict(measured)
    if bouncer is None:
        rows["PgBouncer"] = f"skipped: {NOT_INSTALLED}"
    return table(rows, server, pgbouncer)


if __name__ == "__main__":
    record(measure, "load")
