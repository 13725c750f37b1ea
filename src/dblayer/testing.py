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

- `database_url`: a fresh clone for this test alone, dropped after it (roles a test makes are
  the server's, not the database's: name them after the database, `<database>_app`, and the run
  drops them with its databases at the end). For code that opens its own
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
import signal
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
from sqlalchemy.exc import ArgumentError
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
_USED_KEY = "dblayer_testing_used"  # handed back: the worker made databases
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
        f"(default: {DEFAULT_SETUP}, the Alembic migrations; "
        "`yourpackage.models:Base.metadata.create_all` also works)",
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
    used: bool = False  # whether this process made a database (a worker tells its controller)
    _admin: psycopg.Connection[tuple[Any, ...]] | None = None
    _setup_failed: str | None = None  # the setup's error: not retried by every later test

    def start(self) -> URL:
        """The server: TEST_DATABASE_URL, or an embedded one, started on first use."""
        if self.admin_url is None:
            url, valid = _test_database_url()
            if not valid:
                raise pytest.UsageError("TEST_DATABASE_URL is not a database URL")
            if url is not None:
                self.admin_url = url.set(database=url.database or "postgres")
            else:  # pgserver's PostgreSQL 16, or the major DBLAYER_PG names (from npm)
                self.embedded = EmbeddedPostgres().start()
                self.admin_url = self.embedded.url("postgres")
        return self.admin_url

    @property
    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._admin is None:
            try:
                self._admin = connect(self.start())
            except psycopg.OperationalError as exc:
                # from None: psycopg's frames hold the password (pytest --showlocals prints them)
                raise RuntimeError(f"cannot connect to the test server: {exc}") from None
            self.used = True
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
        if self._setup_failed is not None:
            raise RuntimeError(f"the template's setup failed earlier: {self._setup_failed}")
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
                        if conn.in_transaction():  # `metadata.create_all(conn)` leaves one open
                            conn.commit()
                except BaseException as exc:
                    self._setup_failed = f"{type(exc).__name__}: {exc}"
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
            if self.owner and self.used:
                pattern = f"{self.prefix}{self.run}\\_%"
                rows = self.admin.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname DESC",
                    (pattern,),
                ).fetchall()
                for (name,) in rows:
                    self.drop(str(name))
                # Roles belong to the server and outlive databases: those a test named after its
                # database (as it must, tests running at once on one server) go with them.
                roles = self.admin.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (pattern,)
                ).fetchall()
                for (role,) in roles:
                    self.admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(str(role))))
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


def _test_database_url() -> tuple[URL | None, bool]:
    """(TEST_DATABASE_URL parsed or None when unset, whether it parsed). Its raw text, password
    included, stays in this frame: the caller's error, shown with --showlocals, never holds it."""
    raw = os.environ.get("TEST_DATABASE_URL", "").strip()
    try:
        return (make_url(raw) if raw else None), True
    except (ArgumentError, ValueError):
        return None, False


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect(url: URL) -> psycopg.Connection[tuple[Any, ...]]:
    """Autocommit psycopg, from keyword arguments: no escaping, and no password in an error.
    The URL's query (`sslmode`, `sslrootcert`, a socket directory as `host` …) is passed on."""
    options: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
    host = url.host or options.pop("host", None)  # `?host=/run/postgresql`: a socket directory
    options.pop("host", None)
    return psycopg.connect(
        **options,
        host=host,
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
    target: Any = importlib.import_module(module)
    for part in name.split("."):  # `package.models:Base.metadata.create_all` works too
        target = getattr(target, part)
    return cast("Callable[[Connection], None]", target)


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


def _loop_scopes(config: pytest.Config) -> tuple[str, str]:
    """pytest-asyncio's default loop scopes of fixtures and of tests ("function" when unset)."""
    fixtures = config.getini("asyncio_default_fixture_loop_scope") or "function"
    tests = config.getini("asyncio_default_test_loop_scope") or "function"
    return str(fixtures), str(tests)


def _loop_scope_mismatch(fixtures: str, tests: str) -> str:
    return (
        f"asyncio_default_fixture_loop_scope = {fixtures} with tests in a {tests} loop: "
        "dblayer.testing needs the two equal, so a test runs in the loop its fixtures' "
        "connections belong to"
    )


def pytest_configure(config: pytest.Config) -> None:
    fixtures, tests = _loop_scopes(config)
    if fixtures != tests:
        # Every connection a fixture made would be used from another loop ("attached to a
        # different loop"): refused before any test runs.
        raise pytest.UsageError(_loop_scope_mismatch(fixtures, tests))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # A CI timeout or `kill` ends the run like Ctrl-C: the cleanup below still runs.
        signal.signal(signal.SIGTERM, _interrupt)
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker tells its controller whether it made databases to drop."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_USED_KEY] = session.config.stash[_RUN].used


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    if getattr(node, "workeroutput", {}).get(_USED_KEY):
        node.config.stash[_RUN].used = True


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
    `engine`, `session` and `app` use. Tests there write only through `session` (rolled back);
    what a test commits on a connection of its own stays for the worker's later tests, so such a
    test takes `database_url`. Session-scoped, so a session-scoped fixture may build on it."""
    url = _dblayer_run.url(_dblayer_run.clone(), _driver())
    return get_settings(
        database_url=url.render_as_string(hide_password=False),
        # One key for the run: the app signs and reads its page cursors without warning.
        db_cursor_secret=secrets.token_urlsafe(32),
    )


def _loop_lives_for_the_run(config: pytest.Config) -> bool:
    """Whether async fixtures share one event loop for the whole run (pytest-asyncio's
    `asyncio_default_fixture_loop_scope = session`) rather than a loop per test."""
    return _loop_scopes(config)[0] == "session"


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
    marker = request.node.get_closest_marker("asyncio")
    marked = marker.kwargs.get("loop_scope") if marker is not None else None
    fixtures, _ = _loop_scopes(request.config)
    if marked is not None and marked != fixtures:
        pytest.fail(_loop_scope_mismatch(fixtures, str(marked)), pytrace=False)
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
    """The reference app on this worker's database. For your own app, override this fixture
    and `session_dependency` in your conftest.py."""
    from dblayer.api.app import create_app

    return create_app(database_settings)


@pytest.fixture
def session_dependency() -> Callable[..., Any]:
    """The dependency that gives the app's routes their session, which `client` replaces."""
    from dblayer.api.deps import get_session

    return get_session


def _depends_on(app: FastAPI, dependency: Callable[..., Any]) -> bool:
    """Whether any route of `app` takes `dependency`, directly or through another one (routes
    of included routers too: FastAPI keeps those under `original_router`)."""
    routes: list[Any] = list(app.routes)
    dependants: list[Any] = []
    while routes:
        route = routes.pop()
        if hasattr(route, "original_router"):
            routes.extend(route.original_router.routes)
        elif getattr(route, "dependant", None) is not None:
            dependants.append(route.dependant)
    while dependants:
        dependant = dependants.pop()
        if dependant.call is dependency:
            return True
        dependants.extend(dependant.dependencies)
    return False


# --8<-- [start:client]
@pytest_asyncio.fixture
async def client(
    app: FastAPI, session_dependency: Callable[..., Any], session: AsyncSession
) -> AsyncIterator[httpx.AsyncClient]:
    """The app, started (its lifespan runs), with its session dependency yielding `session`
    in a savepoint per request: the test sees what a request wrote, a failed request undoes
    only its own work, and the next test sees none of it. An error the app does not handle is
    raised in the test, with its traceback. Requests share the test's session: send them one
    at a time."""
    import httpx

    if not _depends_on(app, session_dependency):
        # Overriding a dependency no route takes would let the app commit for real.
        name = getattr(session_dependency, "__qualname__", session_dependency)
        pytest.fail(f"no route of the app takes {name}: override `session_dependency`")

    async def test_session() -> AsyncIterator[AsyncSession]:
        # A request's own transaction, as a savepoint: released when the endpoint returns,
        # rolled back when it raises, and the test's own rows (even uncommitted) stay.
        async with session.begin_nested():
            yield session

    app.dependency_overrides[session_dependency] = test_session
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client
    finally:
        app.dependency_overrides.pop(session_dependency, None)
    # --8<-- [end:client]
