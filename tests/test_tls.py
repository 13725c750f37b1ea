"""TLS as providers configure it (`?sslmode=require`, `verify-full` with a CA), under both drivers,
against an embedded server with `ssl=on` and a certificate from a throwaway CA (trustme).

The certificate names `localhost` only, so connecting to 127.0.0.1 with `verify-full` is the wrong
host name, and `verify-ca` (which checks the CA but not the name) still connects.

pgserver's PostgreSQL is built without OpenSSL: the server here runs on the system's binaries, and
without any the module is skipped with one line (`.ci/run` sets REQUIRE_TLS_TEST: there it fails).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from sqlalchemy import make_url, text

from dblayer.embedded import Binaries, EmbeddedPostgres, find_binaries
from dblayer.engine import check_connection, create_engine
from dblayer.settings import Driver, get_settings
from tests.unavailable import unavailable_error


@dataclass(frozen=True)
class TLSServer:
    server: EmbeddedPostgres
    ca_file: Path  # the CA that signed the server's certificate (and the client's)
    client_cert: Path
    client_key: Path

    def url(self, driver: Driver, host: str = "localhost", **query: str) -> str:
        url = self.server.url("postgres", driver).set(host=host).update_query_dict(query)
        return url.render_as_string(hide_password=False)


def tls_binaries() -> Binaries:
    """The first PostgreSQL here built with OpenSSL: pgserver's wheel, else the system's."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for binaries in [find_binaries(), *(find_binaries(bindir) for bindir in system)]:
        if binaries.supports_tls:
            return binaries
    message = (
        "no PostgreSQL built with OpenSSL here (pgserver's is not): "
        "`make test PG=18` (npm's binaries are), or apt-get install postgresql"
    )
    if os.environ.get("REQUIRE_TLS_TEST"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    binaries = tls_binaries()
    ca = trustme.CA()
    files = tmp_path_factory.mktemp("tls")
    server_cert = ca.issue_cert("localhost")  # not 127.0.0.1: that is the wrong name
    for pem in server_cert.cert_chain_pems:
        pem.write_to_path(str(files / "server.crt"), append=True)
    server_cert.private_key_pem.write_to_path(str(files / "server.key"))
    ca.cert_pem.write_to_path(str(files / "ca.crt"))
    client = ca.issue_cert("postgres", common_name="postgres")
    client.cert_chain_pems[0].write_to_path(str(files / "client.crt"))
    client.private_key_pem.write_to_path(str(files / "client.key"))
    (files / "client.key").chmod(0o600)  # libpq refuses a key others can read
    server = EmbeddedPostgres(
        binaries,
        ssl_cert_file=files / "server.crt",
        ssl_key_file=files / "server.key",
        ssl_ca_file=files / "ca.crt",  # so that the server asks for (but needs no) client cert
    )
    with server:
        yield TLSServer(server, files / "ca.crt", files / "client.crt", files / "client.key")


@pytest.fixture(autouse=True)
def _no_default_root_certificate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both drivers fall back on ~/.postgresql/root.crt and PGSSL*: neither may exist here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"):
        monkeypatch.delenv(name, raising=False)


async def connected(database_url: str) -> dict[str, object]:
    """Connect with the canonical engine; what pg_stat_ssl says about our own connection."""
    engine = create_engine(get_settings(database_url=database_url))
    try:
        await check_connection(engine)
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT ssl, version, client_dn FROM pg_stat_ssl "
                        "WHERE pid = pg_backend_pid()"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    return dict(row._mapping)


async def refused(database_url: str, caplog: pytest.LogCaptureFixture) -> str:
    """The one-line error of `check_connection`, checked for the password (as for any failure)
    and not worth retrying: waiting fixes no certificate, so pre-start fails at once."""
    error = await unavailable_error(make_url(database_url), caplog)
    assert error.transient is False
    return str(error)


async def test_require_encrypts(tls_server: TLSServer, driver: Driver) -> None:
    """What Heroku, Render or Neon hand out: encrypted, the certificate not checked."""
    row = await connected(tls_server.url(driver, host="127.0.0.1", sslmode="require"))
    assert row["ssl"] is True
    assert str(row["version"]).startswith("TLSv1.")


async def test_verify_full_with_the_ca(tls_server: TLSServer, driver: Driver) -> None:
    url = tls_server.url(driver, sslmode="verify-full", sslrootcert=str(tls_server.ca_file))
    assert (await connected(url))["ssl"] is True


async def test_verify_ca_does_not_check_the_host_name(
    tls_server: TLSServer, driver: Driver
) -> None:
    url = tls_server.url(
        driver, host="127.0.0.1", sslmode="verify-ca", sslrootcert=str(tls_server.ca_file)
    )
    assert (await connected(url))["ssl"] is True


async def test_a_client_certificate_is_sent(tls_server: TLSServer, driver: Driver) -> None:
    url = tls_server.url(
        driver,
        sslmode="verify-full",
        sslrootcert=str(tls_server.ca_file),
        sslcert=str(tls_server.client_cert),
        sslkey=str(tls_server.client_key),
    )
    assert "CN=postgres" in str((await connected(url))["client_dn"])


async def test_disable_does_not_encrypt(tls_server: TLSServer, driver: Driver) -> None:
    assert (await connected(tls_server.url(driver, sslmode="disable")))["ssl"] is False


async def test_verify_full_refuses_the_wrong_host_name(
    tls_server: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls_server.url(
        driver, host="127.0.0.1", sslmode="verify-full", sslrootcert=str(tls_server.ca_file)
    )
    message = await refused(url, caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{tls_server.server.port}/postgres: the server's certificate "
        "is not valid for host '127.0.0.1' (sslmode=verify-full checks the name: connect by a "
        "name the certificate has)"
    )


async def test_verify_ca_refuses_a_certificate_from_another_ca(
    tls_server: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.crt"))
    url = tls_server.url(driver, sslmode="verify-ca", sslrootcert=str(tmp_path / "other.crt"))
    message = await refused(url, caplog)
    assert message.endswith(": the server's certificate is not signed by the CA in sslrootcert")


async def test_channel_binding_with_psycopg(tls_server: TLSServer) -> None:
    """SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS), as Neon's URLs ask for."""
    url = tls_server.url("psycopg", sslmode="require", channel_binding="require")
    assert (await connected(url))["ssl"] is True


async def test_the_systems_ca_store_is_used_for_sslrootcert_system(
    tls_server: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """`sslrootcert=system` (libpq 16+, and provider URLs that use it) means the system's CAs:
    this server's throwaway CA is not among them, so both drivers refuse it, in the same line.
    asyncpg would otherwise look for a file named "system" and fail with a bare error."""
    url = tls_server.url(driver, sslmode="verify-full", sslrootcert="system")
    message = await refused(url, caplog)
    assert message.endswith(": the server's certificate is not signed by the CA in sslrootcert")


async def test_verify_full_without_the_ca_is_refused(
    tls_server: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """Without sslrootcert both drivers look for ~/.postgresql/root.crt, as libpq does."""
    message = await refused(tls_server.url(driver, sslmode="verify-full"), caplog)
    assert message == (
        f"cannot connect to localhost:{tls_server.server.port}/postgres: root certificate file "
        f'"{Path.home() / ".postgresql" / "root.crt"}" does not exist: set sslrootcert (or '
        "DB_SSLROOTCERT) to the CA's certificate"
    )


async def test_require_on_a_server_without_tls_is_refused(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedPostgres() as plain:
        url = plain.url("postgres", driver).update_query_dict({"sslmode": "require"})
        message = await refused(url.render_as_string(hide_password=False), caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{plain.port}/postgres: the server does not offer TLS, and "
        "sslmode requires it"
    )
