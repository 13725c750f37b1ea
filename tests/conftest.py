"""Real PostgreSQL for every test, with no set-up: see `databases.py` for where it comes from."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.engine import create_engine
from dblayer.session import create_sessionmaker
from dblayer.settings import DRIVERS, Driver, get_settings
from tests import verified
from tests.blocks import apply_console_updates, expected_docs_tests
from tests.databases import NO_PASSWORD_AUTH, Databases, Server

SERVER = pytest.StashKey[Server]()
DATABASES = pytest.StashKey[Databases]()

# Variables the settings read: cleared for every test so a developer's shell or .env never leaks in.
_SETTINGS_ENV = ("DATABASE_URL", "DATABASE_DRIVER")
_SETTINGS_PREFIXES = ("POSTGRES_", "DB_")


@dataclass
class Report:
    """What the docs tests ran, gathered from test reports (so from every xdist worker)."""

    blocks: Counter[str] = field(default_factory=Counter)  # per driver
    consoles: Counter[str] = field(default_factory=Counter)  # per driver
    exemptions: dict[str, str] = field(default_factory=dict)  # block -> reason
    finished: int = 0  # docs tests that passed, or were skipped as exempt
    isolation: dict[str, float] = field(default_factory=dict)  # test -> clone + drop seconds

    def add(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == "isolation_seconds" and isinstance(value, float):
                self.isolation[report.nodeid] = self.isolation.get(report.nodeid, 0) + value
            elif key == "docs" and isinstance(value, dict) and report.when == "call":
                self._add_block(report, value)

    def _add_block(self, report: pytest.TestReport, block: dict[str, str]) -> None:
        if report.failed or (report.skipped and not block["exempt"]):
            return  # a block the server could not show (FenceSettings.needs) verified nothing
        if block["exempt"]:
            self.exemptions[block["block"]] = block["exempt"]
        if report.passed:
            counter = self.blocks if block["kind"] == "python" else self.consoles
            counter[block["driver"]] += 1
        self.finished += 1


REPORTS = Report()  # in the process that prints the summary: xdist's controller, or the only one


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
    server = Server.from_environment()
    config.add_cleanup(server.stop)  # also runs after a failure or Ctrl-C
    config.stash[SERVER] = server
    server.read_version()
    if controller:
        # xdist workers start after this hook and inherit the environment: one server for all,
        # each worker with databases (and a template, built on first use) of its own.
        os.environ["TEST_DATABASE_URL"] = server.admin_url.render_as_string(hide_password=False)
        os.environ["DBLAYER_TEST_SERVER_ORIGIN"] = server.origin
        return
    databases = Databases(server)
    config.add_cleanup(databases.teardown)
    config.stash[DATABASES] = databases


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.user_properties:
        REPORTS.add(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Console outputs queued by `make update-examples` go into the pages last; a complete green
    run records what it verified for the index page."""
    for block in apply_console_updates():
        print(f"updated console output: {block}")
    server = session.config.stash.get(SERVER, None)
    if server is None or hasattr(session.config, "workerinput"):
        return
    if session.config.option.update_examples:
        return
    if exitstatus == 0 and REPORTS.finished == expected_docs_tests():
        verified.record(
            server.version,
            blocks=REPORTS.blocks[DRIVERS[0]],
            consoles=REPORTS.consoles[DRIVERS[0]],
            exemptions=len(REPORTS.exemptions),
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    server = config.stash.get(SERVER, None)
    if server is None:
        return None
    return f"postgresql: {server.version} ({server.origin})"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    server = config.stash.get(SERVER, None)
    if server is None:
        return
    report = REPORTS
    write = terminalreporter.write_line
    terminalreporter.section("docs")
    for block, reason in sorted(report.exemptions.items()):
        write(f"exempt: {block}: {reason}")
    if report.isolation:
        costs = sorted(report.isolation.values())
        median = costs[len(costs) // 2] * 1000
        write(f"isolation: {len(costs)} databases, median {median:.0f} ms each (clone + drop)")
    blocks = ", ".join(f"{report.blocks[d]} under {d}" for d in DRIVERS)
    consoles = ", ".join(f"{report.consoles[d]} under {d}" for d in DRIVERS)
    write(
        f"python blocks executed: {blocks}; console blocks executed: {consoles}; "
        f"exemptions: {len(report.exemptions)}; server: PostgreSQL {server.version} "
        f"({server.origin})"
    )


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the developer's shell, and a working directory without a `.env`."""
    for name in list(os.environ):
        if name in _SETTINGS_ENV or name.startswith(_SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def server(pytestconfig: pytest.Config) -> Server:
    return pytestconfig.stash[SERVER]


@pytest.fixture(scope="session")
def databases(pytestconfig: pytest.Config) -> Databases:
    return pytestconfig.stash[DATABASES]


@pytest.fixture(scope="session")
def password_auth(server: Server) -> None:
    """For tests that show a wrong password refused: skipped, in one line, where none is."""
    if not server.enforces_passwords:
        pytest.skip(NO_PASSWORD_AUTH)


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (the site in a browser), so that xdist does not start one of them
    last and leave it running alone at the end."""
    items.sort(key=lambda item: not getattr(getattr(item, "module", None), "LONGEST_FIRST", False))
