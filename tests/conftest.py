"""Real PostgreSQL for every test, with no set-up: see `databases.py` for where it comes from."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from dblayer.settings import DRIVERS, Driver
from tests import verified
from tests.blocks import apply_console_updates
from tests.databases import Databases, Server

SERVER = pytest.StashKey[Server]()
DATABASES = pytest.StashKey[Databases]()
REPORT = pytest.StashKey["Report"]()

# Variables the settings read: cleared for every test so a developer's shell or .env never leaks in.
_SETTINGS_ENV = ("DATABASE_URL", "DATABASE_DRIVER")
_SETTINGS_PREFIXES = ("POSTGRES_", "DB_")


@dataclass
class Report:
    """What the docs tests ran, for the closing summary."""

    total: int = 0  # docs tests the run would have if nothing were deselected
    finished: int = 0  # docs tests that passed or were skipped as exempt
    blocks: Counter[str] = field(default_factory=Counter)  # per driver
    consoles: Counter[str] = field(default_factory=Counter)  # per driver
    exemptions: dict[str, str] = field(default_factory=dict)  # block -> reason


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.collectonly:
        return
    # A CI timeout or `kill` sends SIGTERM, which would end the run without cleaning up: treat it
    # as Ctrl-C, so the embedded server is stopped and its files removed either way.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    server = Server.from_environment()
    config.add_cleanup(server.stop)  # also runs after a failure or Ctrl-C
    databases = Databases(server)
    try:
        databases.setup()
    except BaseException:
        server.stop()
        raise
    config.add_cleanup(databases.teardown)
    config.stash[SERVER] = server
    config.stash[DATABASES] = databases
    config.stash[REPORT] = Report()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Console outputs queued by `make update-examples` go into the pages last; a complete green
    run records what it verified for the index page."""
    for block in apply_console_updates():
        print(f"updated console output: {block}")
    report = session.config.stash.get(REPORT, None)
    server = session.config.stash.get(SERVER, None)
    if report is None or server is None or session.config.option.update_examples:
        return
    if exitstatus == 0 and report.total > 0 and report.finished == report.total:
        verified.record(
            server.version,
            blocks=report.blocks[DRIVERS[0]],
            consoles=report.consoles[DRIVERS[0]],
            exemptions=len(report.exemptions),
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    server = config.stash.get(SERVER, None)
    if server is None:
        return None
    return f"postgresql: {server.version} ({server.origin})"


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    report = config.stash.get(REPORT, None)
    server = config.stash.get(SERVER, None)
    databases = config.stash.get(DATABASES, None)
    if report is None or server is None or databases is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("docs")
    for block, reason in sorted(report.exemptions.items()):
        write(f"exempt: {block}: {reason}")
    if databases.clone_seconds:
        per_clone = sorted(databases.clone_seconds)[len(databases.clone_seconds) // 2] * 1000
        write(
            f"isolation: {len(databases.clone_seconds)} databases, median {per_clone:.0f} ms each"
        )
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
def report(pytestconfig: pytest.Config) -> Report:
    return pytestconfig.stash[REPORT]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Driver:
    value: Driver = request.param
    return value


@pytest.fixture
def fresh_database(databases: Databases) -> Iterator[str]:
    """The name of a new database cloned from the template, dropped after the test."""
    name = databases.clone()
    yield name
    databases.drop(name)


@pytest.fixture
def database_url(databases: Databases, fresh_database: str, driver: Driver) -> URL:
    """The URL (password included) of this test's own database, for this test's driver."""
    return databases.url(fresh_database, driver)


@pytest.fixture
async def engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()
