"""Real PostgreSQL in a project's own tests: a pytest plugin, enabled explicitly.

    # conftest.py (at the project's root)
    pytest_plugins = ["dblayer.testing"]

The server is `TEST_DATABASE_URL` (one where tests may create and drop databases) or, without it,
an embedded PostgreSQL started for the run and stopped after it. Its schema is built once per run,
in a template database, by the function the `dblayer_setup` ini option names (by default the
project's Alembic migrations); every database a test gets is a clone of it. Under pytest-xdist
the controller starts the server and every worker shares it and the one template.

Fixtures, all function-scoped. They follow pytest-asyncio's loop scope: with a loop per test
(its default) the engine is made and disposed in each test's loop, so no connection is used from
another loop ("attached to a different loop"); with `asyncio_default_fixture_loop_scope` and
`asyncio_default_test_loop_scope` both `session`, one engine serves the run and its connections
are reused (a plugin check refuses the first without the second).

- `database_url`: a fresh clone for this test alone, dropped after it. For code that opens its own
  connections, or what a transaction cannot isolate (CONCURRENTLY, LISTEN/NOTIFY, advisory locks,
  two connections that must see each other's commits).
- `engine`: an engine on this worker's database (one clone per worker, kept for the run).
- `database_settings`: the `Settings` of that database, for code that builds its own engine.
- `session`: an `AsyncSession` inside a transaction that is rolled back after the test. The code
  under test may `commit()` and `rollback()`: with `join_transaction_mode="create_savepoint"` they
  end savepoints, never the outer transaction, so nothing it writes outlives the test.
- `client`: an `httpx.AsyncClient` on the FastAPI app (the `app` fixture; override it for yours)
  whose session dependency yields `session`, so a test sees what a request committed.
"""

from __future__ import annotations

import importlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from sqlalchemy import URL, Connection, make_url
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import NullPool

from dblayer.embedded import EmbeddedPostgres
from dblayer.engine import create_engine
from dblayer.session import create_sessionmaker
from dblayer.settings import Driver, Settings, SettingsError, get_settings

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI

PREFIX = "dblayer_testing_"  # every database this plugin makes; it never drops anything else
PREFIX_INI = "dblayer_database_prefix"
SETUP_INI = "dblayer_setup"
_PREFIX_SHAPE = re.compile(r"[a-z_][a-z0-9_]{0,29}")  # leaves room in PostgreSQL's 63 bytes
DEFAULT_SETUP = "dblayer.migrate:upgrade"
_URL_KEY = "dblayer_testing_url"  # handed from the xdist controller to its workers
_RUN_KEY = "dblayer_testing_run"
_RUN = pytest.StashKey["_Run"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        PREFIX_INI,
        "the start of every database name the plugin makes (and the only ones it drops); "
        f"one per project when several share a server (default: {PREFIX})",
        default=PREFIX,
    )
    parser.addini(
        SETUP_INI,
        "module:function that builds the template's schema, given a SQLAlchemy Connection "
        f"outside a transaction (default: {DEFAULT_SETUP}, the Alembic migrations)",
        default=DEFAULT_SETUP,
    )


@dataclass
class _Run:
    """The server and the databases of one test run, in one process."""

    setup: str
    prefix: str = PREFIX
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    admin_url: URL | None = None  # a maintenance database on the server
    embedded: EmbeddedPostgres | None = None
    owner: bool = True  # the process that drops this run's databases at the end
    _admin: psycopg.Connection[tuple[Any, ...]] | None = None

    def start(self) -> URL:
        """The server: TEST_DATABASE_URL, or an embedded one, started on first use."""
        if self.admin_url is None:
            raw = os.environ.get("TEST_DATABASE_URL", "").strip()
            if raw:
                url = make_url(raw)
                self.admin_url = url.set(database=url.database or "postgres")
            else:
                self.embedded = EmbeddedPostgres().start()
                self.admin_url = self.embedded.url("postgres")
        return self.admin_url

    @property
    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._admin is None:
            self._admin = connect(self.start())
        return self._admin

    @property
    def template(self) -> str:
        return f"{self.prefix}{self.run}_template"

    def url(self, database: str, driver: Driver) -> URL:
        return self.start().set(drivername=f"postgresql+{driver}", database=database)

    def build_template(self) -> str:
        """Built once per run, whichever process asks first: the others wait on an advisory lock
        and find it made. Built under another name and renamed when complete, so a setup that
        fails leaves no template that later tests would trust."""
        admin = self.admin
        admin.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.template,))
        try:
            if not self._exists(self.template):
                building = f"{self.template}_building"
                self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", building)
                self._execute("CREATE DATABASE {} TEMPLATE template0", building)
                engine = create_sync_engine(self.url(building, "psycopg"), poolclass=NullPool)
                try:
                    with engine.connect() as conn:
                        _setup_function(self.setup)(conn)
                except BaseException:
                    engine.dispose()
                    self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", building)
                    raise
                engine.dispose()
                self._execute(f"ALTER DATABASE {{}} RENAME TO {_quote(self.template)}", building)
        finally:
            admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.template,))
        return self.template

    def clone(self) -> str:
        """A new database from the template: `CREATE DATABASE … TEMPLATE`, tens of ms."""
        template = self.build_template()
        name = f"{self.prefix}{self.run}_{secrets.token_hex(4)}"
        # FILE_COPY (PostgreSQL 15+) copies files instead of WAL-logging every block: faster for
        # a small template, and what older servers always did.
        strategy = " STRATEGY FILE_COPY" if self.admin.info.server_version >= 150000 else ""
        self._execute(f"CREATE DATABASE {{}} TEMPLATE {_quote(template)}{strategy}", name)
        return name

    def drop(self, name: str) -> None:
        self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def finish(self) -> None:
        """The owner drops every database of this run (the template last) and stops the
        embedded server; a worker only closes its connection."""
        try:
            if self.owner and self.admin_url is not None:
                pattern = f"{self.prefix}{self.run}\\_%"
                rows = self.admin.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname DESC",
                    (pattern,),
                ).fetchall()
                for (name,) in rows:
                    self.drop(str(name))
        finally:
            if self._admin is not None:
                self._admin.close()
                self._admin = None
            if self.owner and self.embedded is not None:
                self.embedded.stop()

    def _exists(self, name: str) -> bool:
        found = self.admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return found.fetchone() is not None

    def _execute(self, statement: str, name: str) -> None:
        self.admin.execute(sql.SQL(statement).format(sql.Identifier(name)))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(url: URL) -> psycopg.Connection[tuple[Any, ...]]:
    """Autocommit psycopg, from keyword arguments: no escaping, and no password in an error."""
    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password if isinstance(url.password, str) else None,
        dbname=url.database,
        autocommit=True,
        connect_timeout=10,
    )


def _setup_function(spec: str) -> Callable[[Connection], None]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise pytest.UsageError(f"{SETUP_INI} = {spec!r}: expected module:function")
    return cast("Callable[[Connection], None]", getattr(importlib.import_module(module), name))


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


def pytest_configure(config: pytest.Config) -> None:
    if _loop_lives_for_the_run(config) and (
        config.getini("asyncio_default_test_loop_scope") != "session"
    ):
        # Fixtures in the run's loop, tests in loops of their own: every connection a fixture
        # made would be used from another loop ("attached to a different loop").
        raise pytest.UsageError(
            "asyncio_default_fixture_loop_scope = session needs "
            "asyncio_default_test_loop_scope = session too: tests must run in the loop their "
            "fixtures' connections belong to"
        )
    prefix = str(config.getini(PREFIX_INI))
    if not _PREFIX_SHAPE.fullmatch(prefix):
        raise pytest.UsageError(
            f"{PREFIX_INI} = {prefix!r}: expected lower-case letters, digits and _ "
            "(at most 30), not starting with a digit"
        )
    run = _Run(setup=str(config.getini(SETUP_INI)), prefix=prefix)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and _URL_KEY in workerinput:
        # An xdist worker: the controller's server, run id and template.
        run.admin_url = make_url(workerinput[_URL_KEY])
        run.run = workerinput[_RUN_KEY]
        run.owner = False
    elif _is_xdist_controller(config):
        run.start()  # before the workers start: they need its URL
    config.stash[_RUN] = run
    config.add_cleanup(run.finish)  # also after a failure or Ctrl-C


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's hand-over to each worker (only called when xdist runs)."""
    run = node.config.stash[_RUN]
    node.workerinput[_URL_KEY] = run.start().render_as_string(hide_password=False)
    node.workerinput[_RUN_KEY] = run.run


def _driver() -> Driver:
    """The project's own driver: DATABASE_URL's (`postgresql+psycopg://…`), else
    DATABASE_DRIVER, as the settings read them, so one suite runs under either driver."""
    try:
        driver = get_settings().url.get_driver_name()
    except SettingsError as exc:
        raise pytest.UsageError(f"the settings: {exc}") from None
    return cast("Driver", driver)


@pytest.fixture(scope="session")
def _dblayer_run(pytestconfig: pytest.Config) -> _Run:
    return pytestconfig.stash[_RUN]


# --8<-- [start:database_url]
@pytest.fixture
def database_url(_dblayer_run: _Run) -> Iterator[URL]:
    """A database of this test's own, cloned from the migrated template, dropped after it."""
    name = _dblayer_run.clone()
    try:
        yield _dblayer_run.url(name, _driver())
    finally:
        _dblayer_run.drop(name)
    # --8<-- [end:database_url]


@pytest.fixture(scope="session")
def database_settings(_dblayer_run: _Run) -> Settings:
    """The settings of this worker's database: one clone per process, kept for the run, which
    `engine`, `session` and `app` use (the tests there roll back). Session-scoped, so a reader's
    own session-scoped fixture may build on it."""
    url = _dblayer_run.url(_dblayer_run.clone(), _driver())
    return get_settings(database_url=url.render_as_string(hide_password=False))


def _loop_lives_for_the_run(config: pytest.Config) -> bool:
    """Whether async fixtures share one event loop for the whole run (pytest-asyncio's
    `asyncio_default_fixture_loop_scope = session`) rather than a loop per test."""
    return bool(config.getini("asyncio_default_fixture_loop_scope") == "session")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _run_engine(database_settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The engine for a run whose fixtures share one loop: its pool stays warm across tests.
    Made lazily (no connection until used) and disposed in that loop at the end."""
    async with _disposed_after(database_settings) as engine:
        yield engine


@pytest_asyncio.fixture
async def engine(
    request: pytest.FixtureRequest, database_settings: Settings, _run_engine: AsyncEngine
) -> AsyncIterator[AsyncEngine]:
    """An engine on this worker's database, in the loop the test's fixtures run in: one for
    the run when that loop lives as long (connections are reused), else made for this test and
    disposed after it (a pooled connection never outlives its loop)."""
    if _loop_lives_for_the_run(request.config):
        yield _run_engine
        return
    async with _disposed_after(database_settings) as engine:
        yield engine


@asynccontextmanager
async def _disposed_after(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


# --8<-- [start:session]
@pytest_asyncio.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session in an outer transaction that is rolled back after the test."""
    async with engine.connect() as connection:
        outer = await connection.begin()
        factory = create_sessionmaker(engine)
        async with factory(bind=connection, join_transaction_mode="create_savepoint") as session:
            try:
                yield session
            finally:
                await outer.rollback()
    # --8<-- [end:session]


@pytest.fixture
def app(database_settings: Settings) -> FastAPI:
    """The reference app on this worker's database; override this fixture for your own app."""
    from dblayer.api.app import create_app

    return create_app(database_settings)


# --8<-- [start:client]
@pytest_asyncio.fixture
async def client(app: FastAPI, session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """The app, started (its lifespan runs), with its session dependency yielding `session`
    in a savepoint per request: the test sees what a request wrote, a failed request undoes
    only its own work, and the next test sees none of it."""
    import httpx

    from dblayer.api.deps import get_session

    async def test_session() -> AsyncIterator[AsyncSession]:
        # A request's own transaction, as a savepoint: released when the endpoint returns,
        # rolled back when it raises, and the test's own rows (even uncommitted) stay.
        async with session.begin_nested():
            yield session

    app.dependency_overrides[get_session] = test_session
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client
    finally:
        app.dependency_overrides.pop(get_session, None)
    # --8<-- [end:client]
