"""The async engine: built from settings, checked at start-up, disposed at shutdown.

One engine per process (it owns the connection pool). Every way of not reaching the server becomes
one `DatabaseUnavailableError` (on any connect of `create_engine`'s engines, and in
`check_connection` for any engine), whose message names host, port and the cause, in the same
words for asyncpg and psycopg, and never the password.
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import uuid4

from sqlalchemy import URL, event, make_url, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from dblayer.settings import SERVER_SETTINGS, Settings, SettingsError, get_settings


class DatabaseUnavailableError(RuntimeError):
    """The server could not be reached or refused us. One line, no password.

    `transient` says whether waiting could help (refused, timed out) or not (a wrong password,
    a missing database, a role that may not log in or connect, a setting the server refuses, a
    certificate or key that does not fit): a start-up script retries only the first kind."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


# --8<-- [start:connect_args]
def connect_args(settings: Settings) -> dict[str, Any]:
    """Driver-specific connection arguments: the two drivers spell the same options differently."""
    tls = settings.tls  # libpq's sslmode, sslrootcert, sslcert, sslkey: those that are set
    # --8<-- [start:server_settings]
    # Server settings for every connection, enforced by the server itself: its errors carry a
    # SQLSTATE and the connection is kept. (asyncpg's own command_timeout raises a bare
    # TimeoutError, with no SQLSTATE, and SQLAlchemy discards the connection.)
    server = {}
    for name, field in SERVER_SETTINGS.items():  # statement_timeout: db_statement_timeout, …
        seconds = getattr(settings, field)
        if seconds is not None:  # milliseconds, the unit PostgreSQL reads a bare number in
            server[name] = f"{max(1, round(seconds * 1000))}"
    # asyncpg: connect_args["server_settings"] = server; psycopg: "-c name=value" in "options"
    # --8<-- [end:server_settings]
    if settings.driver == "psycopg":
        # libpq counts whole seconds and treats anything below 2 as 2.
        args: dict[str, Any] = {"connect_timeout": max(2, round(settings.db_connect_timeout))}
        args |= tls  # libpq's own parameters, as they are
        if server:  # libpq's startup options, as `PGOPTIONS` would pass them
            args["options"] = " ".join(f"-c {name}={value}" for name, value in server.items())
        if settings.db_external_pooler:
            args["prepare_threshold"] = None  # never prepare: the next transaction may be elsewhere
        return args
    args = {"timeout": settings.db_connect_timeout}
    if server:
        args["server_settings"] = server
    if tls.pop("channel_binding", "prefer") == "require":
        raise SettingsError(
            "channel_binding=require: asyncpg cannot bind authentication to the TLS channel; "
            "use DATABASE_DRIVER=psycopg, or remove it from the URL"
        )
    if tls.get("sslrootcert") == "system":
        args["ssl"] = _system_ca_context(tls)  # asyncpg would look for a file named "system"
    elif "sslmode" in tls:
        args["ssl"] = tls.pop("sslmode")  # asyncpg takes libpq's modes, with libpq's meaning
    if tls:
        # ... but reads the certificate files only from a DSN; the URL's host, user and database
        # still apply, since keyword arguments override what a DSN says.
        args["dsn"] = f"postgresql://?{urlencode(tls)}"
    if settings.db_external_pooler:
        args |= {
            "statement_cache_size": 0,  # asyncpg's own cache of prepared statements
            "prepared_statement_cache_size": 0,  # SQLAlchemy's cache on top of it
            # asyncpg still prepares; unique names cannot clash on a server connection that
            # another client used before us.
            "prepared_statement_name_func": _unique_statement_name,
        }
    return args
    # --8<-- [end:connect_args]


def _system_ca_context(tls: dict[str, str]) -> ssl.SSLContext:
    """libpq's `sslrootcert=system` for asyncpg: the system's CA store, the host name checked
    unless the mode is verify-ca. Like libpq, only a verifying mode makes sense with it. Takes
    the parameters it uses out of `tls`."""
    del tls["sslrootcert"]
    mode = tls.pop("sslmode", "verify-full")
    if mode not in ("verify-ca", "verify-full"):
        raise SettingsError(
            f"sslrootcert=system needs sslmode verify-ca or verify-full, not {mode}"
        )
    context = ssl.create_default_context()
    context.check_hostname = mode == "verify-full"
    if "sslcert" in tls:
        context.load_cert_chain(tls.pop("sslcert"), tls.pop("sslkey", None))
    return context


def check_tls_files(settings: Settings) -> None:
    """A certificate or key file that is not there is a setting to fix, said when the engine is
    made and in one line naming it (asyncpg would say only "No such file or directory", without
    the name, at every connect). `system` is libpq's name for the system's CA store."""
    tls = settings.tls
    url = settings.database_url
    in_url = make_url(url.get_secret_value().strip()).query if url is not None else {}
    for name in ("sslrootcert", "sslcert", "sslkey"):
        path = tls.get(name)
        if path is not None and path != "system" and not Path(path).is_file():
            setting = f"DATABASE_URL's {name}" if name in in_url else f"DB_{name.upper()}"
            raise SettingsError(f"{setting}: no such file {path!r}")


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid4()}__"


# --8<-- [start:create_engine]
def create_engine(settings: Settings | None = None) -> AsyncEngine:
    """Create the process-wide async engine from settings (the environment when not given)."""
    settings = settings or get_settings()
    check_tls_files(settings)
    if settings.db_external_pooler:
        # PgBouncer owns the pooling; a second pool here would hold server connections idle.
        engine = create_async_engine(
            settings.url,
            echo=settings.db_echo,
            hide_parameters=settings.db_hide_parameters,
            poolclass=NullPool,
            connect_args=connect_args(settings),
        )
    else:
        engine = create_async_engine(
            settings.url,
            echo=settings.db_echo,
            hide_parameters=settings.db_hide_parameters,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout,
            pool_recycle=settings.db_pool_recycle,
            pool_pre_ping=settings.db_pool_pre_ping,
            pool_use_lifo=settings.db_pool_use_lifo,
            connect_args=connect_args(settings),
        )
    classify_connect_failures(engine)
    return engine
    # --8<-- [end:create_engine]


# --8<-- [start:classify]
def classify_connect_failures(engine: AsyncEngine) -> None:
    """Make every failure to open a connection one `DatabaseUnavailableError`, raised to whichever
    query needed the connection. Only here is an `OSError` known to be about the database, and
    the drivers differ here: asyncpg lets a network failure out as a bare `OSError` or
    `TimeoutError`, which SQLAlchemy does not wrap, where psycopg raises an `OperationalError`."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def connect(dialect: Dialect, record: object, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except (OSError, dialect.loaded_dbapi.Error) as exc:
            message, transient = _failure(engine.url, exc)
            raise DatabaseUnavailableError(message, transient=transient) from None

    # --8<-- [end:classify]


# --8<-- [start:check_connection]
async def check_connection(engine: AsyncEngine) -> str:
    """Connect once and return the server version (`SHOW server_version`), or raise a clear error.

    Call it at start-up: a wrong password or an unreachable host then fails the deploy in one line
    instead of failing the first request with a traceback.
    """
    try:
        async with engine.connect() as conn:
            version = await conn.scalar(text("SHOW server_version"))
    except (DBAPIError, OSError, TimeoutError) as exc:
        message, transient = _failure(engine.url, exc)
        raise DatabaseUnavailableError(message, transient=transient) from None
    return str(version)
    # --8<-- [end:check_connection]


def describe_failure(url: URL, exc: BaseException) -> str:
    """One line saying where we tried to connect and why it failed, the same for both drivers."""
    return _failure(url, exc)[0]


def _failure(url: URL, exc: BaseException) -> tuple[str, bool]:
    """The one-line description, and whether waiting could help (see DatabaseUnavailableError)."""
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    cause, transient = _cause(url, exc)
    return f"cannot connect to {where}: {cause}", transient


def _cause(url: URL, exc: BaseException) -> tuple[str, bool]:
    """Classify the driver's error; both drivers' messages are read, neither is repeated whole.
    Whatever the server refuses for good (a wrong password, role, database, privilege or
    setting: SQLSTATE class 28, 42501, 3D000, 22023) or a certificate is permanent; anything else
    may pass (transient). asyncpg gives the SQLSTATE; psycopg (libpq) only the server's text, so
    the known refusals are read from the text, in the same words for both."""
    original: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        original = exc.orig
    # asyncpg wraps OS errors in SQLAlchemy's InterfaceError only sometimes; look at the chain.
    chain = [e for e in (original, original.__cause__, original.__context__) if e is not None]
    message = " ".join(str(e) for e in chain)
    lowered = message.lower()
    sqlstate = next((s for e in chain if isinstance(s := getattr(e, "sqlstate", None), str)), None)
    if (tls := _tls_cause(url, message)) is not None:
        return tls, False  # a certificate or TLS set-up does not fix itself by waiting
    if (refusal := _server_refusal(url, message)) is not None:
        return refusal, False
    if sqlstate is not None and sqlstate.startswith(_PERMANENT_SQLSTATES):
        return _first_line(message, url), False
    if any(isinstance(e, TimeoutError | asyncio.TimeoutError) for e in chain) or (
        sqlstate is None and "timeout" in lowered  # not a server's refusal naming a timeout
    ):
        return "timed out; is the host reachable and the port open?", True
    if (
        any(isinstance(e, ConnectionRefusedError) for e in chain)
        or "refused" in lowered
        or _refused_on_every_address(message)
    ):
        return "connection refused; is the server running on that port?", True
    if isinstance(exc, InterfaceError | DBAPIError):
        return _first_line(message, url), True
    return _first_line(f"{type(original).__name__}: {original}", url), True


def _refused_on_every_address(message: str) -> bool:
    """asyncio's `OSError` for a host name with several addresses (`localhost` as ::1 and
    127.0.0.1): "Multiple exceptions: [Errno 111] Connect call failed …, …", a plain `OSError`
    with no errno of its own. A refusal when some address refused and every other one cannot be
    used here at all (IPv6 off: no such address, network or family), so that the refusal is
    what there is to fix; anything else (a timeout, an unreachable host) is said as it is."""
    if "Multiple exceptions: " not in message:
        return False
    attempts = message.count("Connect call failed")
    errnos = [int(number) for number in re.findall(r"\[Errno (\d+)\]", message)]
    return (
        len(errnos) == attempts
        and errno.ECONNREFUSED in errnos
        and all(number in _REFUSED_OR_UNUSABLE for number in errnos)
    )


_REFUSED_OR_UNUSABLE = {
    errno.ECONNREFUSED,
    errno.EADDRNOTAVAIL,
    errno.ENETUNREACH,
    errno.EAFNOSUPPORT,
}


# Refused for good: authorization (class 28), no privilege, no such database, a bad setting.
_PERMANENT_SQLSTATES = ("28", "42501", "3D000", "22023")


def _server_refusal(url: URL, message: str) -> str | None:
    """The server's refusals that waiting does not fix, read from either driver's text."""
    lowered = message.lower()
    if "password authentication failed" in lowered:
        return f"password authentication failed for user {url.username!r}"
    if "does not exist" in lowered and "database" in lowered:
        return f"database {url.database!r} does not exist"
    if "role" in lowered and "does not exist" in lowered:
        return f"role {url.username!r} does not exist"
    if match := re.search(r'role "([^"]*)" is not permitted to log in', message):
        return f"role {match.group(1)!r} is not permitted to log in (NOLOGIN)"
    if match := re.search(r'permission denied for database "([^"]*)"', message):
        return f"role {url.username!r} has no CONNECT privilege on database {match.group(1)!r}"
    if match := re.search(r'invalid value for parameter "([^"]*)": "([^"]*)"', message):
        return f'the server refused the value "{match.group(2)}" for {match.group(1)}'
    if match := re.search(r"no pg_hba\.conf entry for [^\n]*", message):
        return match.group(0)
    return None


def _tls_cause(url: URL, message: str) -> str | None:
    """TLS failures in the same words for both drivers (asyncpg's are Python's ssl module's)."""
    lowered = message.lower()
    if "does not match host name" in lowered or "mismatch, certificate is not valid" in lowered:
        return (
            f"the server's certificate is not valid for host {url.host!r} (sslmode=verify-full "
            "checks the name: connect by a name the certificate has)"
        )
    if "certificate verify failed" in lowered:  # libpq does not say which check failed
        return (
            "the server's certificate could not be verified against sslrootcert (signed by "
            "another CA, expired or not yet valid)"
        )
    # libpq names the file, and what OpenSSL said (not always the cause: its error queue may
    # hold an older error); Python's ssl module names neither.
    if "no certificate or crl found" in lowered or "could not read root certificate" in lowered:
        return (
            "sslrootcert (or DB_SSLROOTCERT) could not be read as a certificate: set it to the "
            "CA's certificate"
        )
    if "key values mismatch" in lowered or "could not load private key" in lowered:
        return (
            "the key in sslkey (or DB_SSLKEY) could not be loaded, or does not match the "
            "certificate in sslcert (or DB_SSLCERT)"
        )
    if readable := re.search(r'private key file "([^"]*)" has group or world access', message):
        return (
            f'the key file "{readable.group(1)}" can be read by others, and libpq refuses it: '
            "chmod 600 it"
        )
    missing = re.search(r'root certificate file "([^"]*)" does not exist', message)
    if missing:
        path = _home_as_tilde(missing.group(1))
        return (
            f'root certificate file "{path}" does not exist: set sslrootcert '
            "(or DB_SSLROOTCERT) to the CA's certificate"
        )
    if "requires a valid client certificate" in lowered:
        return (
            "the server asks for a client certificate: set sslcert and sslkey "
            "(or DB_SSLCERT and DB_SSLKEY)"
        )
    if "certificate authentication failed" in lowered:
        return (
            f"the client certificate is not for user {url.username!r} (cert authentication "
            "needs its CN to be the user's name)"
        )
    if "rejected ssl upgrade" in lowered or "server does not support ssl" in lowered:
        return "the server does not offer TLS, and sslmode requires it"
    return None


def _home_as_tilde(path: str) -> str:
    """libpq's default CA file, `~/.postgresql/root.crt`, as its documentation writes it: the
    same line on every machine."""
    home = str(Path.home())
    return "~" + path[len(home) :] if path.startswith(home + "/") else path


def _first_line(message: str, url: URL) -> str:
    """The first line of a driver message, with the password scrubbed in case a driver echoes it."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    password = url.password
    if isinstance(password, str) and password:
        line = line.replace(password, "***")
    return line
