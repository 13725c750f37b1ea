"""Real PostgreSQL for every test, with no set-up: see `databases.py` for where it comes from."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.engine import create_engine
from dblayer.pgbouncer import PgBouncer
from dblayer.session import create_sessionmaker
from dblayer.settings import DRIVERS, Driver, get_settings
from tests import drivers
from tests.blocks import apply_console_updates
from tests.databases import NO_CLIENT_CHECK, NO_PASSWORD_AUTH, Databases, Server
from tests.pgbouncer import serve_pgbouncer
from tests.replica import ReplicaDatabases, serve_replica_databases
from tests.tls import TLSDatabases, serve_tls_databases

pytest_plugins = ["tests.report"]  # the run report: what ran, the summary, the site's record

SERVER = pytest.StashKey[Server]()
DATABASES = pytest.StashKey[Databases]()
WORKER_SERVER = "dblayer_server"  # the key in xdist's workerinput


class WorkerNode(Protocol):
    """What `pytest_configure_node` is given (xdist's WorkerController, which is untyped)."""

    config: pytest.Config
    workerinput: dict[str, Any]


# Variables the settings read: cleared for every test so a developer's shell or .env never leaks in.
_SETTINGS_ENV = (
    "DATABASE_URL",
    "MIGRATION_DATABASE_URL",
    "DATABASE_REPLICA_URL",
    "DATABASE_DRIVER",
)
_SETTINGS_PREFIXES = ("POSTGRES_", "DB_")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


@pytest.hookimpl(trylast=True)  # after pytest-cov has started measuring (in xdist workers too)
def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.collectonly:
        return
    # A CI timeout or `kill` sends SIGTERM, which would end the run without cleaning up: treat it
    # as Ctrl-C, so the embedded server is stopped and its files removed either way.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    controller = _is_xdist_controller(config)
    if controller and config.option.update_examples:
        raise pytest.UsageError("--update-examples rewrites pages: run it without -n")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller's server
        given = config.workerinput[WORKER_SERVER]
        server = Server.from_url(given["url"], origin=given["origin"])
    else:
        server = Server.from_environment()
    config.add_cleanup(server.stop)  # also runs after a failure or Ctrl-C
    config.stash[SERVER] = server
    server.read_version()
    from tests.report import REPORT  # imported by pytest_plugins first, so assert-rewritten

    config.stash[REPORT].server = server
    if controller:
        # xdist workers start after this hook (see pytest_configure_node): one server for all,
        # each worker with databases (and a template, built on first use) of its own.
        return
    databases = Databases(server)
    config.add_cleanup(databases.teardown)
    config.stash[DATABASES] = databases


@pytest.hookimpl(optionalhook=True)  # xdist's hook: absent under -p no:xdist
def pytest_configure_node(node: WorkerNode) -> None:
    """Each xdist worker gets the controller's server through `workerinput`."""
    server = node.config.stash[SERVER]
    node.workerinput[WORKER_SERVER] = {
        "url": server.admin_url.render_as_string(hide_password=False),
        "origin": server.origin,
    }


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Console outputs queued by `make update-examples` go into the pages last."""
    for block in apply_console_updates():
        print(f"updated console output: {block}")


# Set by coverage (pyproject.toml's `patch = ["subprocess"]`): every Python subprocess started
# with it is measured, which doubles the time of the many that need not be (a site build, a
# page's console block). Tests whose subprocesses run src/ code ask for `subprocess_coverage`.
_SUBPROCESS_COVERAGE = "COVERAGE_PROCESS_CONFIG"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the developer's shell, and a working directory without a `.env`."""
    for name in list(os.environ):
        if name in _SETTINGS_ENV or name.startswith(_SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.delenv(_SUBPROCESS_COVERAGE, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command's main() configures logging for its process (`logging.basicConfig`): undone
    after the test, or its handler would go on writing to this test's captured stderr, which is
    closed by then ("--- Logging error ---" in a later test's output)."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def subprocess_coverage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coverage measures this test's Python subprocesses (an xdist worker, a killed run)."""
    if value := _COVERAGE_AT_START:
        monkeypatch.setenv(_SUBPROCESS_COVERAGE, value)


_COVERAGE_AT_START = os.environ.get(_SUBPROCESS_COVERAGE)


@pytest.fixture(scope="session")
def server(pytestconfig: pytest.Config) -> Server:
    return pytestconfig.stash[SERVER]


@pytest.fixture(scope="session")
def databases(pytestconfig: pytest.Config) -> Databases:
    return pytestconfig.stash[DATABASES]


@pytest.fixture(scope="session")
def tls_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSDatabases]:
    """The server of the pages' `needs="tls"` blocks (tests/tls.py), whichever server the run
    uses otherwise: started when the first such block runs (in each xdist worker), with its own
    template; skipped in one line where no PostgreSQL has OpenSSL."""
    with serve_tls_databases(tmp_path_factory.mktemp("tls")) as databases:
        yield databases


@pytest.fixture(scope="session")
def pgbouncer(server: Server) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the run's server (the pages' `needs="pgbouncer"`
    blocks, tests/test_pgbouncer.py): started on first use in each xdist worker; skipped in one
    line where it is not installed (REQUIRE_PGBOUNCER_TEST makes that a failure)."""
    with serve_pgbouncer(server.admin_url) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def replica_databases() -> Iterator[ReplicaDatabases]:
    """A primary with a streaming replica (tests/replica.py), for the pages' `needs="replica"`
    blocks and tests/test_routing.py, whichever server the run uses otherwise: started on first
    use (in each xdist worker), stopped at the end."""
    with serve_replica_databases() as databases:
        yield databases


@pytest.fixture(scope="session")
def password_auth(server: Server) -> None:
    """For tests that show a wrong password refused: skipped, in one line, where none is."""
    if not server.enforces_passwords:
        pytest.skip(NO_PASSWORD_AUTH)


@pytest.fixture(scope="session")
def client_check(server: Server) -> None:
    """For tests that show a client gone mid-statement noticed by the server, or not."""
    if not server.shows_client_connection_checks:
        pytest.skip(NO_CLIENT_CHECK)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Driver:
    value: Driver = request.param
    return value


@pytest.fixture
def fresh_database(databases: Databases, request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of a new database cloned from the template, dropped after the test."""
    started = time.perf_counter()
    name = databases.clone()
    cloned = time.perf_counter() - started
    yield name
    started = time.perf_counter()
    databases.drop(name)
    request.node.user_properties.append(
        ("isolation_seconds", cloned + time.perf_counter() - started)
    )


@pytest.fixture
def database_url(databases: Databases, fresh_database: str, driver: Driver) -> URL:
    """The URL (password included) of this test's own database, for this test's driver."""
    return databases.url(fresh_database, driver)


@pytest.fixture
async def engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """The canonical engine (`dblayer.engine.create_engine`) on this test's database."""
    settings = get_settings(database_url=database_url.render_as_string(hide_password=False))
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The canonical session factory (`create_sessionmaker`) on this test's engine."""
    return create_sessionmaker(engine)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never answers, like a black-holing firewall."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        drivers.OPTION,
        action="store_true",
        help="run each test and block under one driver, chosen per test (the quick loop)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The quick loop's one driver per test (tests/drivers.py); then the longest tests first
    (the site in a browser), so that xdist does not start one of them last and leave it running
    alone at the end."""
    if config.getoption(drivers.OPTION) and not config.option.update_examples:
        items[:], left_out = drivers.one_driver_each(items)
        config.hook.pytest_deselected(items=left_out)
    items.sort(key=lambda item: not getattr(getattr(item, "module", None), "LONGEST_FIRST", False))
