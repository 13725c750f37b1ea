"""The engine against a real server, under both drivers: versions, failures, secrets, dispose."""

from __future__ import annotations

import asyncio
import errno
import ssl
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import trustme
from sqlalchemy import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError

from dblayer.engine import (
    _failure,
    check_connection,
    connect_args,
    create_engine,
    describe_failure,
)
from dblayer.settings import Driver, SettingsError, get_settings
from dblayer.testing import connect
from tests.localhost import require_ipv6_localhost
from tests.unavailable import unavailable, unavailable_error


def test_connect_args_per_driver() -> None:
    assert connect_args(get_settings(db_connect_timeout=2.5)) == {"timeout": 2.5}
    psycopg = get_settings(database_driver="psycopg", db_connect_timeout=0.5)
    assert connect_args(psycopg) == {"connect_timeout": 2}  # libpq's minimum
    assert connect_args(get_settings(database_driver="psycopg")) == {"connect_timeout": 10}


def test_connect_args_carry_the_tls_settings(tmp_path: Path) -> None:
    """libpq (psycopg) takes its own parameters; asyncpg takes the mode as `ssl` and reads the
    files from a DSN, whose values the keyword arguments (host, user, ...) override."""
    ca = tmp_path / "ca dir" / "ca.pem"
    ca.parent.mkdir()
    ca.write_text("a CA")
    url = f"postgresql://shop:pw@db/shop?sslmode=verify-full&sslrootcert={quote(str(ca))}"
    assert connect_args(get_settings(database_url=url)) == {
        "timeout": 10.0,
        "ssl": "verify-full",
        "dsn": f"postgresql://?{urlencode({'sslrootcert': str(ca)})}",
    }
    assert connect_args(get_settings(database_url=url, database_driver="psycopg")) == {
        "connect_timeout": 10,
        "sslmode": "verify-full",
        "sslrootcert": str(ca),
    }
    assert connect_args(get_settings(db_sslmode="require")) == {"timeout": 10.0, "ssl": "require"}


def test_channel_binding_goes_to_libpq_and_is_refused_for_asyncpg() -> None:
    """Neon's URLs ask for `channel_binding=require`: libpq (psycopg) does it; asyncpg cannot, and
    silently connecting without it would be weaker than the URL asked for."""
    url = "postgresql://u:p@ep-x.example.com/db?sslmode=require&channel_binding=require"
    psycopg = connect_args(get_settings(database_url=url, database_driver="psycopg"))
    assert psycopg["channel_binding"] == "require"
    with pytest.raises(SettingsError, match=r"^channel_binding=require: asyncpg cannot bind"):
        connect_args(get_settings(database_url=url))
    preferred = url.replace("channel_binding=require", "channel_binding=prefer")
    assert connect_args(get_settings(database_url=preferred)) == {"timeout": 10.0, "ssl": "require"}


def test_sslrootcert_system_is_the_systems_ca_store_for_asyncpg(tmp_path: Path) -> None:
    """libpq 16 reads `system` as "the system's CAs"; asyncpg gets an SSLContext that says so."""
    for mode, checks_host in [("verify-full", True), ("verify-ca", False)]:
        settings = get_settings(db_sslmode=mode, db_sslrootcert="system")
        context = connect_args(settings)["ssl"]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.check_hostname is checks_host
        assert "dsn" not in connect_args(settings)
    client = trustme.CA().issue_cert("postgres")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    with_cert = get_settings(db_sslrootcert="system", db_sslcert=str(tmp_path / "client.pem"))
    assert isinstance(connect_args(with_cert)["ssl"], ssl.SSLContext)  # verify-full by default
    with pytest.raises(SettingsError) as refused:
        connect_args(get_settings(db_sslmode="require", db_sslrootcert="system"))
    assert (
        str(refused.value)
        == "sslrootcert=system needs sslmode verify-ca or verify-full, not require"
    )


@pytest.mark.parametrize("name", ["sslrootcert", "sslcert", "sslkey"])
@pytest.mark.parametrize("driver_name", ["asyncpg", "psycopg"])
def test_a_tls_file_that_is_not_there_is_one_line_at_once(name: str, driver_name: str) -> None:
    """asyncpg alone would raise a bare "No such file or directory" at every connect."""
    settings = get_settings(
        database_driver=driver_name, db_sslmode="verify-full", **{f"db_{name}": "/nowhere/x.pem"}
    )
    with pytest.raises(SettingsError) as refused:
        create_engine(settings)
    assert str(refused.value) == f"DB_{name.upper()}: no such file '/nowhere/x.pem'"


@pytest.mark.parametrize("name", ["sslrootcert", "sslcert", "sslkey"])
def test_a_tls_file_in_the_url_that_is_not_there_names_the_url(name: str) -> None:
    """The message names the setting to fix: DATABASE_URL's query, not a DB_ variable."""
    url = f"postgresql://shop:hunter2@db.example.com/shop?sslmode=verify-full&{name}=/nowhere/x.pem"
    with pytest.raises(SettingsError) as refused:
        create_engine(get_settings(database_url=url, **{f"db_{name}": "/nowhere/ignored.pem"}))
    assert str(refused.value) == f"DATABASE_URL's {name}: no such file '/nowhere/x.pem'"


async def test_engine_from_the_environment_uses_the_pool_settings(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, driver: Driver
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    monkeypatch.setenv("DB_POOL_RECYCLE", "60")
    engine = create_engine()
    try:
        assert engine.dialect.driver == driver
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.pool._recycle == 60
        assert engine.pool._pre_ping is True
        version = await check_connection(engine)
    finally:
        await engine.dispose()
    assert version.split(".")[0].isdigit()
    assert int(version.split(".")[0]) >= 14  # the oldest major the guide is verified on


@pytest.mark.usefixtures("password_auth")
async def test_wrong_password(database_url: URL, caplog: pytest.LogCaptureFixture) -> None:
    message = await unavailable(database_url.set(password="hunter2"), caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{database_url.port}/{database_url.database}: "
        "password authentication failed for user 'postgres'"
    )


async def test_missing_database(database_url: URL, caplog: pytest.LogCaptureFixture) -> None:
    message = await unavailable(database_url.set(database="no_such_db"), caplog)
    assert message.endswith("/no_such_db: database 'no_such_db' does not exist")


async def test_refused_port(database_url: URL, caplog: pytest.LogCaptureFixture) -> None:
    message = await unavailable(database_url.set(port=1), caplog)
    assert message == "cannot connect to 127.0.0.1:1/" + str(database_url.database) + (
        ": connection refused; is the server running on that port?"
    )


async def test_refused_on_every_address_of_the_name(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """`localhost` as ::1 and 127.0.0.1: asyncio tries both and raises one plain `OSError`
    ("Multiple exceptions: [Errno 111] …", no errno of its own), psycopg lists every attempt."""
    require_ipv6_localhost()
    message = await unavailable(database_url.set(host="localhost", port=1), caplog)
    assert message == "cannot connect to localhost:1/" + str(database_url.database) + (
        ": connection refused; is the server running on that port?"
    )


def _multiple(*errnos: int) -> OSError:
    """The `OSError` asyncio raises when every address of the name failed."""
    addresses = ["('::1', 1, 0, 0)", "('127.0.0.1', 1)"]
    return OSError(
        "Multiple exceptions: "
        + ", ".join(
            f"[Errno {number}] Connect call failed {address}"
            for number, address in zip(errnos, addresses, strict=True)
        )
    )


REFUSED = (
    "cannot connect to db.internal:5432/shop: connection refused; is the server running on "
    "that port?"
)


@pytest.mark.parametrize(
    "errnos",
    [
        (errno.ECONNREFUSED, errno.ECONNREFUSED),  # as the test above, on a two-address localhost
        (errno.EADDRNOTAVAIL, errno.ECONNREFUSED),  # ::1 listed, IPv6 off: 127.0.0.1 refused
        (errno.ENETUNREACH, errno.ECONNREFUSED),
    ],
)
def test_asyncios_multiple_refusals_are_a_refusal(errnos: tuple[int, int]) -> None:
    assert describe_failure(URL_WITH_SECRET, _multiple(*errnos)) == REFUSED


@pytest.mark.parametrize(
    "error",
    [
        _multiple(errno.ETIMEDOUT, errno.ECONNREFUSED),  # one address did not answer at all
        _multiple(errno.ENETUNREACH, errno.EADDRNOTAVAIL),  # none refused: no server to start
        OSError(  # an attempt without an errno: not known to be a refusal
            f"Multiple exceptions: [Errno {errno.ECONNREFUSED}] Connect call failed ('::1', 1),"
            " Connect call failed ('127.0.0.1', 1)"
        ),
    ],
)
def test_other_multiple_exceptions_are_said_as_they_are(error: OSError) -> None:
    assert describe_failure(URL_WITH_SECRET, error) == (
        f"cannot connect to db.internal:5432/shop: OSError: {error}"
    )


async def test_unreachable_fails_fast_naming_the_host(
    database_url: URL, silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    message = await unavailable(database_url.set(port=silent_port), caplog, db_connect_timeout=1)
    assert loop.time() - started < 5  # the connect timeout, not the OS's minutes
    assert message.startswith(f"cannot connect to 127.0.0.1:{silent_port}/")
    assert message.endswith("timed out; is the host reachable and the port open?")


async def refused_for_good(
    url: URL,
    caplog: pytest.LogCaptureFixture,
    unvalidated: dict[str, object] | None = None,
    **values: object,
) -> str:
    """The one-line error, not worth retrying: pre-start must fail at once, not wait it out."""
    error = await unavailable_error(url, caplog, unvalidated, **values)
    assert error.transient is False
    return str(error)


async def test_a_role_that_may_not_log_in_is_refused_for_good(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLSTATE 28000 under asyncpg, only the text under psycopg: the same line either way."""
    role = f"{database_url.database}_nologin"
    with connect(database_url) as admin:
        admin.execute(f"CREATE ROLE \"{role}\" NOLOGIN PASSWORD 'pw'")
    message = await refused_for_good(database_url.set(username=role, password="pw"), caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{database_url.port}/{database_url.database}: "
        f"role '{role}' is not permitted to log in (NOLOGIN)"
    )


async def test_a_role_without_connect_on_the_database_is_refused_for_good(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLSTATE 42501: the database's CONNECT privilege revoked from PUBLIC, not granted back."""
    role = f"{database_url.database}_outsider"
    with connect(database_url) as admin:
        admin.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'")
        admin.execute(f'REVOKE CONNECT ON DATABASE "{database_url.database}" FROM PUBLIC')
    message = await refused_for_good(database_url.set(username=role, password="pw"), caplog)
    assert message == (
        f"cannot connect to 127.0.0.1:{database_url.port}/{database_url.database}: "
        f"role '{role}' has no CONNECT privilege on database '{database_url.database}'"
    )


async def test_a_server_setting_out_of_range_is_refused_for_good(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLSTATE 22023: a value the server cannot hold. Not "timed out", though it says timeout.
    The settings refuse this one (DB_STATEMENT_TIMEOUT's bound); a server may be narrower."""
    message = await refused_for_good(database_url, caplog, {"db_statement_timeout": 10**9})
    assert message == (
        f"cannot connect to 127.0.0.1:{database_url.port}/{database_url.database}: "
        'the server refused the value "1000000000000" for statement_timeout'
    )


def test_repr_of_engine_hides_the_password() -> None:
    engine = create_engine(get_settings(postgres_password="hunter2"))
    assert "hunter2" not in repr(engine.sync_engine)
    assert "hunter2" not in repr(engine.url)


# The causes no live server here produces, fed as the drivers raise them.
URL_WITH_SECRET = make_url("postgresql+asyncpg://app:hunter2@db.internal:5432/shop")


class DriverError(Exception):
    """Stands in for a driver exception wrapped by SQLAlchemy."""


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            DBAPIError("SELECT 1", None, DriverError('FATAL: role "app" does not exist')),
            "role 'app' does not exist",
        ),
        (
            InterfaceError("connect", None, DriverError("SSL required\nsecond line hunter2")),
            "SSL required",
        ),
        (DBAPIError("connect", None, DriverError("")), "unknown error"),
        (OSError("network down for app:hunter2"), "OSError: network down for app:***"),
    ],
)
def test_other_causes_are_summarised_on_one_line(error: Exception, cause: str) -> None:
    assert describe_failure(URL_WITH_SECRET, error) == (
        f"cannot connect to db.internal:5432/shop: {cause}"
    )


class ServerError(Exception):
    """Stands in for asyncpg's error as SQLAlchemy passes it on: with the server's SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "cause", "transient"),
    [
        (  # psycopg's text (libpq gives no SQLSTATE for a failed connect), asyncpg's the same
            DriverError(
                'connection to server at "10.0.0.5", port 5432 failed: FATAL:  no pg_hba.conf '
                'entry for host "10.0.0.7", user "app", database "shop", no encryption'
            ),
            'no pg_hba.conf entry for host "10.0.0.7", user "app", database "shop", no encryption',
            False,
        ),
        (  # any other refusal of class 28: permanent, said as the server says it
            ServerError("a refusal no release of PostgreSQL words like this", "28000"),
            "a refusal no release of PostgreSQL words like this",
            False,
        ),
        (  # a server error naming a timeout is not one: 57014 is the server cancelling
            ServerError("canceling statement due to statement timeout", "57014"),
            "canceling statement due to statement timeout",
            True,
        ),
    ],
)
def test_the_sqlstate_decides_before_the_text(
    error: Exception, cause: str, transient: bool
) -> None:
    """What `check_connection` and every connect raise: message and `transient` together."""
    assert _failure(URL_WITH_SECRET, DBAPIError("connect", None, error)) == (
        f"cannot connect to db.internal:5432/shop: {cause}",
        transient,
    )


def test_describe_failure_without_host_port_or_password() -> None:
    url = make_url("postgresql+asyncpg://app@/shop?host=/run/postgresql")
    assert describe_failure(url, ConnectionRefusedError()) == (
        "cannot connect to localhost:5432/shop: connection refused; is the server running on "
        "that port?"
    )
    assert describe_failure(url, OSError("no route")) == (
        "cannot connect to localhost:5432/shop: OSError: no route"
    )


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (  # psycopg (libpq)
            DriverError(
                'server certificate for "localhost" does not match host name "db.internal"'
            ),
            "the server's certificate is not valid for host 'db.internal' (sslmode=verify-full "
            "checks the name: connect by a name the certificate has)",
        ),
        (  # asyncpg (Python's ssl module)
            DriverError(
                "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                "local issuer certificate (_ssl.c:1006)"
            ),
            "the server's certificate could not be verified against sslrootcert (signed by "
            "another CA, expired or not yet valid)",
        ),
        (  # libpq's default place, in the home directory: written as its documentation does
            DriverError(
                f'root certificate file "{Path.home()}/.postgresql/root.crt" does not exist'
            ),
            'root certificate file "~/.postgresql/root.crt" does not exist: set sslrootcert '
            "(or DB_SSLROOTCERT) to the CA's certificate",
        ),
        (
            DriverError('root certificate file "/srv/ca/root.crt" does not exist'),
            'root certificate file "/srv/ca/root.crt" does not exist: set sslrootcert '
            "(or DB_SSLROOTCERT) to the CA's certificate",
        ),
        (  # a `hostssl … cert` line in pg_hba.conf, no certificate sent
            DriverError("FATAL:  connection requires a valid client certificate"),
            "the server asks for a client certificate: set sslcert and sslkey "
            "(or DB_SSLCERT and DB_SSLKEY)",
        ),
        (  # a certificate whose CN is another user's
            DriverError('FATAL:  certificate authentication failed for user "app"'),
            "the client certificate is not for user 'app' (cert authentication needs its CN to "
            "be the user's name)",
        ),
        (
            DriverError('PostgreSQL server at "db.internal:5432" rejected SSL upgrade'),
            "the server does not offer TLS, and sslmode requires it",
        ),
    ],
)
def test_tls_failures_in_the_same_words_for_both_drivers(error: Exception, cause: str) -> None:
    """What tests/test_tls.py produces against a real TLS server, here without one."""
    wrapped = InterfaceError("connect", None, error)
    assert describe_failure(URL_WITH_SECRET, wrapped) == (
        f"cannot connect to db.internal:5432/shop: {cause}"
    )
