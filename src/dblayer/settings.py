"""Settings from the environment (and `.env`), validated once, with the password kept secret.

Two ways to say where the database is, as twelve-factor apps and container platforms do:

* `DATABASE_URL`, one string (`postgresql://user:password@host:5432/dbname`), or
* `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_USER`, `POSTGRES_PASSWORD`, `POSTGRES_DB`.

TLS is said the way libpq says it, in the URL's query (`?sslmode=require`, as providers hand it
out) or as `DB_SSLMODE`, `DB_SSLROOTCERT`, `DB_SSLCERT`, `DB_SSLKEY`; the engine passes it to each
driver in that driver's own terms (see `engine.connect_args`).

The URL handed to SQLAlchemy is always built with `sqlalchemy.URL.create`, so a password such as
`p@ss:w/rd%20#?` needs no escaping by hand. Errors name the setting and the fix, never the password.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

# --8<-- [start:drivers]
Driver = Literal["asyncpg", "psycopg"]
DRIVERS: tuple[Driver, ...] = ("asyncpg", "psycopg")
# `postgresql://` and `postgres://` (Heroku, compose files) mean "the configured driver".
_SCHEMES = {"postgresql", "postgres"} | {f"postgresql+{d}" for d in DRIVERS}
# --8<-- [end:drivers]

# --8<-- [start:tls]
SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
SSL_MODES: tuple[SSLMode, ...] = get_args(SSLMode)
ChannelBinding = Literal["disable", "prefer", "require"]
# libpq's TLS parameters, as providers write them in DATABASE_URL (`?sslmode=require`; Neon adds
# `channel_binding=require`, which psycopg's libpq does and asyncpg cannot).
TLS_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "channel_binding")
# --8<-- [end:tls]


class SettingsError(ValueError):
    """A setting is missing or wrong. The message is one line and never contains a password."""


# --8<-- [start:settings]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a wait on our side: finite, > 0
# The server keeps its timeouts in milliseconds as an int: 2147483.647 s is the most it takes.
Timeout = Annotated[float, Field(gt=0, le=2147483.647, allow_inf_nan=False)]
# The app's timeouts, which migrations run without (see `Settings.for_migrations`).
APP_TIMEOUTS = ("db_statement_timeout", "db_lock_timeout", "db_idle_in_transaction_timeout")
# The PostgreSQL setting each of them sets on every connection (in `dblayer.engine`), and one that
# migrations keep: the server's check that the client is still there while a statement runs.
SERVER_SETTINGS = {
    "statement_timeout": "db_statement_timeout",
    "idle_in_transaction_session_timeout": "db_idle_in_transaction_timeout",
    "lock_timeout": "db_lock_timeout",
    "client_connection_check_interval": "db_client_connection_check_interval",
}


class Settings(BaseSettings):
    """Where the database is and how to talk to it. Every field has an environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",  # a shared .env may hold other services' variables
        hide_input_in_errors=True,  # a validation error must not echo a password back
        frozen=True,
    )

    database_url: SecretStr | None = None  # DATABASE_URL wins over the POSTGRES_* parts
    # The migrations' own login (a role that owns the schema), for prestart and alembic only; the
    # app's role then needs no more than reading and writing rows. Unset: the app's URL.
    migration_database_url: SecretStr | None = None
    # A read replica (a hot standby) for the reads a routing session sends there; unset: none,
    # every statement goes to DATABASE_URL (see `dblayer.routing`).
    database_replica_url: SecretStr | None = None
    database_driver: Driver = "asyncpg"  # DATABASE_DRIVER, used when the URL names none

    postgres_host: str = "localhost"
    postgres_port: Annotated[int, Field(ge=1, le=65535)] = 5432
    postgres_user: str = "postgres"
    postgres_password: SecretStr = SecretStr("postgres")
    postgres_db: str = "app"

    db_echo: bool = False  # log every SQL statement (development only)
    db_hide_parameters: bool = True  # keep bound values (a password hash, an email) out of logs
    # and error messages; set false while debugging
    db_connect_timeout: Seconds = 10.0  # seconds: fail fast, name the host
    # Seconds a statement may run before the server cancels it (SQLSTATE 57014; the API answers
    # 503). Unset: the server's own statement_timeout.
    db_statement_timeout: Timeout | None = None
    # Seconds a transaction may sit idle before the server ends its session (SQLSTATE 25P03): a
    # transaction left open by mistake stops holding locks. Unset: the server's own setting.
    db_idle_in_transaction_timeout: Timeout | None = None
    # Seconds a statement may wait for a lock (behind a migration's DDL) before the server
    # cancels it (SQLSTATE 55P03; the API answers 503). Unset: the server's own lock_timeout.
    db_lock_timeout: Timeout | None = None
    # Seconds between the server's checks, while a statement runs, that the client is still
    # connected (PostgreSQL 14+ on a system that reports a closed socket, as Linux does). A client
    # gone mid-statement (a task cancelled by anyio, a killed process) otherwise leaves the
    # statement running, locks held, to its end.
    db_client_connection_check_interval: Timeout | None = None
    # TLS in libpq's words; DATABASE_URL's own ?sslmode=... wins, as over PGSSLMODE in libpq.
    db_sslmode: SSLMode | None = None  # unset: the drivers' default, prefer
    db_sslrootcert: str | None = None  # the CA file that verify-ca and verify-full check against
    db_sslcert: str | None = None  # a client certificate, for servers that ask for one
    db_sslkey: str | None = None  # its private key (mode 0600)
    db_channel_binding: ChannelBinding | None = None  # SCRAM bound to the TLS channel (psycopg)
    # --8<-- [start:pool_settings]
    db_pool_size: Annotated[int, Field(ge=1)] = 5  # connections kept open
    db_max_overflow: int = 10  # extra connections under load, closed when returned
    db_pool_timeout: Seconds = 30.0  # seconds to wait for a free connection
    db_pool_recycle: Annotated[int, Field(ge=-1)] = 1800  # seconds; -1 never recycles
    db_pool_pre_ping: bool = True  # test a connection before handing it out
    db_pool_use_lifo: bool = False  # reuse the most recent connection, let idle ones time out
    db_external_pooler: bool = False  # behind PgBouncer (transaction mode): no pool of our own
    # --8<-- [end:pool_settings]
    # Signs page cursors (HMAC-SHA256). Set it, the same on every instance and worker, in
    # production: unset, each process makes its own, and refuses the others' cursors.
    db_cursor_secret: SecretStr | None = None
    # --8<-- [end:settings]

    @field_validator("db_max_overflow")
    @classmethod
    def _bounded_overflow(cls, value: int) -> int:
        if value < 0:
            # SQLAlchemy reads -1 as "no limit": a burst could then open more connections than the
            # server's max_connections allows, and fail there instead of queueing here.
            raise ValueError(
                "must be 0 or more; -1 (no limit) is refused, since a burst could then "
                "exceed the server's max_connections"
            )
        return value

    @field_validator("db_external_pooler")
    @classmethod
    def _no_startup_timeouts(cls, value: bool, info: ValidationInfo) -> bool:
        # PgBouncer answers "unsupported startup parameter" to the timeouts `connect_args` sends,
        # and with `ignore_startup_parameters` would drop them silently (docs/scaling-pgbouncer.md).
        given = [(n, f) for n, f in SERVER_SETTINGS.items() if info.data.get(f) is not None]
        if value and given:
            name, field = given[0]
            raise ValueError(
                f"PgBouncer refuses {field.upper()} (sent as a startup parameter); set it on the "
                f"server instead: ALTER ROLE … SET {name}"
            )
        return value

    @field_validator("db_cursor_secret")
    @classmethod
    def _long_cursor_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "must be at least 32 characters; make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("database_url", "migration_database_url", "database_replica_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            # DATABASE_URL's password may move to POSTGRES_PASSWORD; the migrations' has no other.
            hint = "or use POSTGRES_PASSWORD" if info.field_name == "database_url" else ""
            _parse_database_url(value.get_secret_value(), hint)
            return value
        return None  # an empty DATABASE_URL= line means "not set"

    @field_validator("postgres_host", "postgres_user", "postgres_db")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    # --8<-- [start:url]
    @property
    def url(self) -> URL:
        """The SQLAlchemy URL with the async driver set; `str()` and `repr()` hide the password."""
        if self.database_url is not None:
            url = _parse_database_url(self.database_url.get_secret_value())
            driver = url.get_driver_name() if "+" in url.drivername else self.database_driver
            # TLS goes to the driver as connection arguments (asyncpg takes no `sslmode`).
            return url.set(drivername=f"postgresql+{driver}").difference_update_query(
                TLS_PARAMETERS
            )
        return URL.create(
            drivername=f"postgresql+{self.database_driver}",
            username=self.postgres_user,
            password=self.postgres_password.get_secret_value(),
            host=self.postgres_host,
            port=self.postgres_port,
            database=self.postgres_db,
        )
        # --8<-- [end:url]

    # --8<-- [start:tls_property]
    @property
    def tls(self) -> dict[str, str]:
        """libpq's TLS parameters: DATABASE_URL's query first, then `DB_SSLMODE` and the others."""
        given = {name: getattr(self, f"db_{name}") for name in TLS_PARAMETERS}
        if self.database_url is not None:
            query = _parse_database_url(self.database_url.get_secret_value()).query
            given |= {name: query[name] for name in TLS_PARAMETERS if name in query}
        return {name: str(value) for name, value in given.items() if value is not None}
        # --8<-- [end:tls_property]

    # --8<-- [start:migration_url]
    def for_migrations(self) -> Settings:
        """These settings as prestart and alembic build their engine from: the migrations' URL
        (unset: the app's), without the app's timeouts, TLS as the app's unless it says its own.

        The app's statement, lock and idle timeouts would cancel a long backfill or an index build
        on every deploy: each revision sets the `lock_timeout` it needs itself (see 0002, 0003).
        `MIGRATION_DATABASE_URL` with no TLS parameter in its query takes `DATABASE_URL`'s: the
        most powerful login must not fall back to `prefer` (`DB_SSL*` apply to both anyway)."""
        update: dict[str, object] = dict.fromkeys(APP_TIMEOUTS)
        if self.migration_database_url is not None:
            update["database_url"] = self.migration_database_url
            update |= self._apps_tls_for(self.migration_database_url)
        return self.model_copy(update=update)

    def for_replica(self) -> Settings | None:
        """These settings pointed at the replica (`DATABASE_REPLICA_URL`; unset: None), TLS as
        the app's unless its URL says its own, like `for_migrations`; the app's timeouts kept."""
        if self.database_replica_url is None:
            return None
        update = {"database_url": self.database_replica_url}
        return self.model_copy(update=update | self._apps_tls_for(self.database_replica_url))

    def _apps_tls_for(self, other: SecretStr) -> dict[str, object]:
        """DATABASE_URL's TLS parameters, as `DB_SSL…` settings for another URL whose query
        has none of its own (with one of its own: nothing, its query says it all)."""
        own = _parse_database_url(other.get_secret_value()).query
        if self.database_url is None or any(name in own for name in TLS_PARAMETERS):
            return {}
        query = _parse_database_url(self.database_url.get_secret_value()).query
        return {f"db_{name}": query[name] for name in TLS_PARAMETERS if name in query}

    @property
    def migration_url(self) -> URL:
        """The URL migrations run on (`MIGRATION_DATABASE_URL`, else the app's), password hidden."""
        return self.for_migrations().url
        # --8<-- [end:migration_url]

    @property
    def driver(self) -> Driver:
        """The driver the engine will use: the URL's own, else `DATABASE_DRIVER`."""
        name = self.url.get_driver_name()
        return "psycopg" if name == "psycopg" else "asyncpg"


def _parse_database_url(raw: str, hint: str = "") -> URL:
    """Parse `DATABASE_URL` and refuse what would fail later with a worse message; `hint` ends
    the messages about the password (another place to put it).

    Messages never quote the URL: only the scheme, which comes before the credentials.
    """
    hint = f" {hint}" if hint else ""
    try:
        url = make_url(raw.strip())
    except ArgumentError:
        raise ValueError(
            "not a URL; expected postgresql://user:password@host:5432/dbname"
        ) from None
    except ValueError:  # the text after the last ':' before the host was not a port number
        raise ValueError(f"bad port; percent-encode @:/ in the password{hint}") from None
    if url.drivername not in _SCHEMES:
        raise ValueError(f"unsupported {url.drivername!r}; use postgresql+asyncpg or +psycopg")
    if url.host is not None and "@" in url.host:
        # `postgresql://u:p@ss@host/db`: part of the password landed in the host; print neither.
        raise ValueError(f"unescaped '@' in the password; write %40{hint}")
    if not url.host and "host" not in url.query:
        raise ValueError("no host; expected postgresql://user:password@host:5432/dbname")
    if not url.database:
        raise ValueError("no database name; add /dbname after the host")
    _check_query(url)
    return url


def _check_query(url: URL) -> None:
    """Only `host` (a Unix socket) and libpq's TLS parameters: anything else would reach the
    driver as a keyword argument it does not take. A name is quoted only if it looks like one."""
    for name, value in url.query.items():
        if name != "host" and name not in TLS_PARAMETERS:
            quoted = f" {name!r}" if re.fullmatch(r"\w{1,40}", name) else ""
            supported = ", ".join(("host", *TLS_PARAMETERS[:-1]))
            raise ValueError(f"unknown parameter{quoted}; use {supported} or {TLS_PARAMETERS[-1]}")
        if name in TLS_PARAMETERS and not isinstance(value, str):
            raise ValueError(f"{name} given more than once")
    if url.query.get("sslmode", "prefer") not in SSL_MODES:
        raise ValueError(f"sslmode must be {', '.join(SSL_MODES[:-1])} or {SSL_MODES[-1]}")
    if url.query.get("channel_binding", "prefer") not in get_args(ChannelBinding):
        raise ValueError("channel_binding must be disable, prefer or require")


# --8<-- [start:get_settings]
def get_settings(**values: object) -> Settings:
    """Load settings from keyword arguments, the environment and `.env`; raise a one-line error.

    pydantic's own `ValidationError` spans several lines; this names the variable and the problem.
    """
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']).upper()}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise SettingsError(problems) from None
        # --8<-- [end:get_settings]
