"""TLS as providers configure it (`?sslmode=require`, `verify-full` with a CA), under both drivers,
against an embedded server with `ssl=on` and a certificate from a throwaway CA (trustme).

The certificate names `localhost` only, so connecting to 127.0.0.1 with `verify-full` is the wrong
host name, and `verify-ca` (which checks the CA but not the name) still connects.

The server is `tests/tls.py`'s (shared with the pages' `needs="tls"` blocks); without PostgreSQL
built with OpenSSL the module is skipped with one line (`.ci/run` sets REQUIRE_TLS_TEST: there it
fails).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from psycopg import sql
from sqlalchemy import URL, make_url, text
from sqlalchemy import create_engine as sync_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from dblayer.api import create_app
from dblayer.embedded import EmbeddedPostgres
from dblayer.engine import check_connection, create_engine
from dblayer.migrate import upgrade
from dblayer.roles import create_roles
from dblayer.settings import Driver, get_settings
from dblayer.testing import connect
from tests.apps import client_for, new_user, settings_for
from tests.tls import CLIENT_ROLE, TLSServer, tls_server
from tests.unavailable import unavailable_error


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    with tls_server(tmp_path_factory.mktemp("tls")) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_default_root_certificate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both drivers fall back on ~/.postgresql/root.crt and PGSSL*: neither may exist here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"):
        monkeypatch.delenv(name, raising=False)


NOT_VERIFIED = (
    ": the server's certificate could not be verified against sslrootcert (signed by another CA, "
    "expired or not yet valid)"
)


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


async def test_require_encrypts(tls: TLSServer, driver: Driver) -> None:
    """What Heroku, Render or Neon hand out: encrypted, the certificate not checked."""
    row = await connected(tls.url(driver, host="127.0.0.1", sslmode="require"))
    assert row["ssl"] is True
    assert str(row["version"]).startswith("TLSv1.")


async def test_verify_full_with_the_ca(tls: TLSServer, driver: Driver) -> None:
    url = tls.url(driver, sslmode="verify-full", sslrootcert=str(tls.ca_file))
    assert (await connected(url))["ssl"] is True


async def test_verify_ca_does_not_check_the_host_name(tls: TLSServer, driver: Driver) -> None:
    url = tls.url(driver, host="127.0.0.1", sslmode="verify-ca", sslrootcert=str(tls.ca_file))
    assert (await connected(url))["ssl"] is True


async def test_a_client_certificate_is_sent(tls: TLSServer, driver: Driver) -> None:
    url = tls.url(
        driver,
        sslmode="verify-full",
        sslrootcert=str(tls.ca_file),
        sslcert=str(tls.client_cert),
        sslkey=str(tls.client_key),
    )
    assert "CN=app" in str((await connected(url))["client_dn"])


async def test_disable_does_not_encrypt(tls: TLSServer, driver: Driver) -> None:
    assert (await connected(tls.url(driver, sslmode="disable")))["ssl"] is False


async def test_verify_full_refuses_the_wrong_host_name(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls.url(driver, host="127.0.0.1", sslmode="verify-full", sslrootcert=str(tls.ca_file))
    message = await refused(url, caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{tls.server.port}/postgres: the server's certificate "
        "is not valid for host '127.0.0.1' (sslmode=verify-full checks the name: connect by a "
        "name the certificate has)"
    )


async def test_verify_ca_refuses_a_certificate_from_another_ca(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.crt"))
    url = tls.url(driver, sslmode="verify-ca", sslrootcert=str(tmp_path / "other.crt"))
    message = await refused(url, caplog)
    assert message.endswith(NOT_VERIFIED)


async def test_an_expired_server_certificate_is_refused(
    driver: Driver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Signed by the right CA, but out of date: libpq does not say which check failed (Python's
    ssl module does), so both say what it may be."""
    with tls_server(tmp_path, expired=True) as expired:
        url = expired.url(driver, sslmode="verify-full", sslrootcert=str(expired.ca_file))
        message = await refused(url, caplog)
    assert message.endswith(NOT_VERIFIED)


async def test_a_ca_file_that_is_not_a_certificate_is_refused(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    url = tls.url(driver, sslmode="verify-full", sslrootcert=str(tmp_path / "ca.crt"))
    message = await refused(url, caplog)
    assert message.endswith(
        ": sslrootcert (or DB_SSLROOTCERT) could not be read as a certificate: set it to the "
        "CA's certificate"
    )


async def test_a_key_that_is_not_the_certificates_is_refused(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    trustme.CA().issue_cert(CLIENT_ROLE).private_key_pem.write_to_path(str(tmp_path / "c.key"))
    (tmp_path / "c.key").chmod(0o600)
    url = tls.url(
        driver,
        sslmode="verify-full",
        sslrootcert=str(tls.ca_file),
        sslcert=str(tls.client_cert),
        sslkey=str(tmp_path / "c.key"),
    )
    message = await refused(url, caplog)
    assert message.endswith(
        ": the key in sslkey (or DB_SSLKEY) could not be loaded, or does not match the "
        "certificate in sslcert (or DB_SSLCERT)"
    )


async def test_a_key_others_can_read_is_refused_by_libpq(
    tls: TLSServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """psycopg only: asyncpg (Python's ssl module) does not check the file's permissions."""
    key = tmp_path / "client.key"
    key.write_bytes(tls.client_key.read_bytes())
    key.chmod(0o644)
    url = tls.url(
        "psycopg",
        sslmode="verify-full",
        sslrootcert=str(tls.ca_file),
        sslcert=str(tls.client_cert),
        sslkey=str(key),
    )
    message = await refused(url, caplog)
    assert message.endswith(
        f': the key file "{key}" can be read by others, and libpq refuses it: chmod 600 it'
    )


async def test_channel_binding_with_psycopg(tls: TLSServer) -> None:
    """SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS), as Neon's URLs ask for."""
    url = tls.url("psycopg", sslmode="require", channel_binding="require")
    assert (await connected(url))["ssl"] is True


async def test_the_systems_ca_store_is_used_for_sslrootcert_system(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """`sslrootcert=system` (libpq 16+, and provider URLs that use it) means the system's CAs:
    this server's throwaway CA is not among them, so both drivers refuse it, in the same line.
    asyncpg would otherwise look for a file named "system" and fail with a bare error."""
    url = tls.url(driver, sslmode="verify-full", sslrootcert="system")
    message = await refused(url, caplog)
    assert message.endswith(NOT_VERIFIED)


async def test_verify_full_without_the_ca_is_refused(
    tls: TLSServer, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """Without sslrootcert both drivers look for ~/.postgresql/root.crt, as libpq does."""
    message = await refused(tls.url(driver, sslmode="verify-full"), caplog)
    assert message == (
        f"cannot connect to localhost:{tls.server.port}/postgres: root certificate file "
        '"~/.postgresql/root.crt" does not exist: set sslrootcert (or DB_SSLROOTCERT) to the '
        "CA's certificate"
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


@pytest.fixture(scope="module")
def cert_role(tls: TLSServer) -> str:
    """The client certificate's role, with a database of its name: pg_hba.conf's `hostssl
    sameuser … cert` line asks it for that certificate; a second role, with no certificate."""
    with connect(make_url(tls.url("psycopg"))) as conn:
        for role in (CLIENT_ROLE, "other"):
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"CREATE DATABASE {role} OWNER {role}")
    return CLIENT_ROLE


def as_role(tls: TLSServer, driver: Driver, role: str, **query: str) -> str:
    """`role` on its own database, with no password: only a certificate can let it in."""
    url = URL.create(
        f"postgresql+{driver}",
        username=role,
        host="localhost",
        port=tls.server.port,
        database=role,
        query={"sslmode": "verify-full", "sslrootcert": str(tls.ca_file), **query},
    )
    return url.render_as_string()


async def test_cert_authentication_with_the_client_certificate(
    tls: TLSServer, cert_role: str, driver: Driver
) -> None:
    url = as_role(tls, driver, cert_role, sslcert=str(tls.client_cert), sslkey=str(tls.client_key))
    assert str((await connected(url))["client_dn"]).endswith(f"/CN={cert_role}")


async def test_cert_authentication_without_a_certificate_is_refused(
    tls: TLSServer, cert_role: str, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """Both drivers said it differently (asyncpg "Error: …", psycopg the whole libpq line), and
    as if waiting could help."""
    message = await refused(as_role(tls, driver, cert_role), caplog)
    assert message == (
        f"cannot connect to localhost:{tls.server.port}/{cert_role}: the server asks for a "
        "client certificate: set sslcert and sslkey (or DB_SSLCERT and DB_SSLKEY)"
    )


async def test_a_certificate_for_another_role_is_refused(
    tls: TLSServer, cert_role: str, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    url = as_role(tls, driver, "other", sslcert=str(tls.client_cert), sslkey=str(tls.client_key))
    message = await refused(url, caplog)
    assert message == (
        f"cannot connect to localhost:{tls.server.port}/other: the client certificate is not "
        "for user 'other' (cert authentication needs its CN to be the user's name)"
    )


MIGRATOR_PASSWORD = "m1grat0r over TLS"
APP_PASSWORD = "app p@ss over TLS"


async def test_the_reference_app_over_verified_tls_as_the_app_role(
    tls: TLSServer, driver: Driver
) -> None:
    """Issue 15's deployment: the reference app on its own database, migrated by the migrator
    role, run as the app role, both over `verify-full` with the CA (in DATABASE_URL, as providers
    hand it out). Requests that read and write succeed, the app role may not drop a table, and
    every connection its pool holds is encrypted. Roles are cluster-wide: named after the
    database. (They log in with passwords: pg_hba.conf's `cert` line is for a role on the
    database of its own name only.)"""
    database = f"reference_{driver}"
    migrator, app = f"{database}_migrator", f"{database}_app"
    admin = connect(make_url(tls.url("psycopg")))
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        owner_url = make_url(
            tls.url(driver, database=database, sslmode="verify-full", sslrootcert=str(tls.ca_file))
        )
        await create_roles(
            settings_for(owner_url),
            migrator=migrator,
            app=app,
            migrator_password=MIGRATOR_PASSWORD,
            app_password=APP_PASSWORD,
        )
        migrator_url = owner_url.set(username=migrator, password=MIGRATOR_PASSWORD)
        engine = sync_engine(migrator_url.set(drivername="postgresql+psycopg"), poolclass=NullPool)
        with engine.connect() as conn:  # Alembic manages the transactions
            upgrade(conn)
        engine.dispose()
        settings = settings_for(owner_url.set(username=app, password=APP_PASSWORD))
        async for client in client_for(create_app(settings)):
            ready = await client.get("/ready")
            assert (ready.status_code, ready.json()["status"]) == (200, "ready")
            ada = await new_user(client)
            created = await client.post("/tasks", json={"user_id": ada["id"], "title": "TLS"})
            assert created.status_code == 201, created.text
            listed = (await client.get("/tasks")).json()
            assert [task["title"] for task in listed["items"]] == ["TLS"]
            # The app's connections, by role: the migrator's and the owner's, closed before,
            # may still be leaving pg_stat_activity (a server process exits after its client).
            row = admin.execute(
                "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a"
                " USING (pid) WHERE a.datname = %s AND a.usename = %s",
                (database, app),
            ).fetchone()
            assert row is not None
            assert row[0] >= 1  # the app is connected, as its role
            assert row[1] is True  # and every connection of its is on TLS
        as_app = create_engine(settings)
        try:
            with pytest.raises(DBAPIError) as dropping:
                async with as_app.begin() as conn:
                    await conn.execute(text("DROP TABLE tasks"))
        finally:
            await as_app.dispose()
        assert getattr(dropping.value.orig, "sqlstate", None) == "42501"  # insufficient_privilege
    finally:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
        for role in (migrator, app):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()
