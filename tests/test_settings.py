"""Settings: where the URL comes from, how it is escaped, and what bad input looks like."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy import make_url

from dblayer.settings import Settings, SettingsError, get_settings

HOSTILE = "p@ss:w/rd%20#?"


def test_defaults_build_the_url_from_the_parts() -> None:
    settings = get_settings()
    assert settings.url.render_as_string(hide_password=False) == (
        "postgresql+asyncpg://postgres:postgres@localhost:5432/app"
    )
    assert settings.driver == "asyncpg"
    assert (settings.db_pool_size, settings.db_max_overflow, settings.db_pool_pre_ping) == (
        5,
        10,
        True,
    )


def test_database_url_wins_over_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "ignored.example")
    monkeypatch.setenv("DATABASE_URL", "postgres://shop:s3cret@db.internal:6543/shop")
    url = get_settings().url
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg",
        "db.internal",
        6543,
        "shop",
    )


@pytest.mark.parametrize(
    ("scheme", "driver_setting", "expected"),
    [
        ("postgresql", "asyncpg", "asyncpg"),
        ("postgresql", "psycopg", "psycopg"),
        ("postgres", "psycopg", "psycopg"),
        ("postgresql+psycopg", "asyncpg", "psycopg"),  # the URL's own driver wins
        ("postgresql+asyncpg", "psycopg", "asyncpg"),
    ],
)
def test_driver_choice(
    monkeypatch: pytest.MonkeyPatch, scheme: str, driver_setting: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"{scheme}://u:pw@h/db")
    monkeypatch.setenv("DATABASE_DRIVER", driver_setting)
    settings = get_settings()
    assert settings.driver == expected
    assert settings.url.drivername == f"postgresql+{expected}"


def test_psycopg_from_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_DRIVER", "psycopg")
    assert get_settings().url.drivername == "postgresql+psycopg"


def test_an_empty_database_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "  ")
    settings = get_settings()
    assert settings.database_url is None
    assert settings.url.host == "localhost"


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"POSTGRES_PASSWORD={HOSTILE}\nDB_POOL_SIZE=7\nOTHER_APP=1\n")
    settings = get_settings()
    assert settings.postgres_password.get_secret_value() == HOSTILE
    assert settings.db_pool_size == 7


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("DB_POOL_SIZE=7\n")
    monkeypatch.setenv("DB_POOL_SIZE", "9")
    assert get_settings().db_pool_size == 9


def test_a_hostile_password_survives_the_round_trip() -> None:
    url = get_settings(postgres_password=HOSTILE).url
    rendered = url.render_as_string(hide_password=False)
    assert HOSTILE not in rendered  # escaped ...
    assert make_url(rendered).password == HOSTILE  # ... and back
    # The escaped form works in DATABASE_URL too.
    assert get_settings(database_url=rendered).url.password == HOSTILE


def test_unix_socket_urls_need_no_host() -> None:
    url = get_settings(database_url="postgresql://app@/app?host=/var/run/postgresql").url
    assert url.query["host"] == "/var/run/postgresql"


def test_the_password_is_hidden_everywhere() -> None:
    settings = get_settings(
        database_url=f"postgresql://shop:{HOSTILE.replace('@', '%40')}@db/shop",
        postgres_password=HOSTILE,
    )
    for text in (repr(settings), str(settings), repr(settings.url), str(settings.url)):
        assert "p@ss" not in text
        assert "p%40ss" not in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"database_url": "not a url"}, "DATABASE_URL: not a URL"),
        (
            {"database_url": "postgresql://u:hunter2@h/db?channel_binding=always"},
            "DATABASE_URL: channel_binding must be disable, prefer or require",
        ),
        ({"database_url": "mysql://u:hunter2@h/db"}, "DATABASE_URL: unsupported 'mysql'"),
        ({"database_url": "postgresql+psycopg2://u:hunter2@h/db"}, "unsupported 'postgresql+psy"),
        ({"database_url": "postgresql://u:hunter2@@h/db"}, "unescaped '@' in the password"),
        ({"database_url": "postgresql://u:hunter2@ss:w/rd@h/db"}, "DATABASE_URL: bad port"),
        ({"database_url": "postgresql://u:hunter2@/db"}, "DATABASE_URL: no host"),
        ({"database_url": "postgresql://u:hunter2@h"}, "DATABASE_URL: no database name"),
        ({"database_driver": "psycopg2"}, "DATABASE_DRIVER: Input should be 'asyncpg'"),
        ({"postgres_host": " "}, "POSTGRES_HOST: must not be empty"),
        ({"postgres_port": 70000}, "POSTGRES_PORT: Input should be less than or equal to 65535"),
        ({"db_pool_size": 0}, "DB_POOL_SIZE: Input should be greater than or equal to 1"),
        ({"db_connect_timeout": 0}, "DB_CONNECT_TIMEOUT: Input should be greater than 0"),
        ({"db_connect_timeout": "inf"}, "DB_CONNECT_TIMEOUT: Input should be a finite number"),
        ({"db_pool_timeout": "nan"}, "DB_POOL_TIMEOUT: Input should be a finite number"),
        (
            {"database_url": "postgresql://u:hunter2@h/db?sslmode=on"},
            "DATABASE_URL: sslmode must be disable, allow, prefer, require, verify-ca or "
            "verify-full",
        ),
        (
            {"database_url": "postgresql://u:hunter2@h/db?ssl=true"},
            "DATABASE_URL: unknown parameter 'ssl'; use host, sslmode, sslrootcert, sslcert, "
            "sslkey or channel_binding",
        ),
        (
            {"database_url": "postgresql://u:hunter2@h/db?x%0Ay=hunter2"},
            "DATABASE_URL: unknown parameter; use host, sslmode,",
        ),
        (
            {"database_url": "postgresql://u:hunter2@h/db?sslmode=require&sslmode=disable"},
            "DATABASE_URL: sslmode given more than once",
        ),
        ({"db_sslmode": "verify_full"}, "DB_SSLMODE: Input should be 'disable', 'allow'"),
    ],
)
def test_bad_settings_give_one_line_without_the_password(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        get_settings(**values)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert "hunter2" not in text
    assert caught.value.__cause__ is None  # `from None`: the pydantic error (with input) is gone


def test_bad_environment_is_reported_with_the_variable_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTGRES_PORT", "5432a")
    monkeypatch.setenv("DB_POOL_SIZE", "-1")
    with pytest.raises(SettingsError, match=r"POSTGRES_PORT: .*; DB_POOL_SIZE: "):
        get_settings()


def test_pydantics_own_error_does_not_echo_the_input_either() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(database_url="mysql://u:hunter2@h/db")
    assert "hunter2" not in str(caught.value)


def test_settings_are_frozen() -> None:
    settings = get_settings()
    with pytest.raises(ValidationError):
        settings.db_pool_size = 1  # type: ignore[misc]


PROVIDER_URL = "postgres://shop:hunter2@db.example.com:5432/shop?sslmode=require"


def test_a_provider_url_with_sslmode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heroku, Render, Neon: `?sslmode=require`. The TLS parameters travel as connection
    arguments (see `connect_args`), so the URL handed to SQLAlchemy has none left."""
    monkeypatch.setenv("DATABASE_URL", PROVIDER_URL)
    settings = get_settings()
    assert settings.tls == {"sslmode": "require"}
    assert str(settings.url) == "postgresql+asyncpg://shop:***@db.example.com:5432/shop"


def test_tls_settings_for_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_SSLMODE", "verify-full")
    monkeypatch.setenv("DB_SSLROOTCERT", "/etc/ssl/certs/db-ca.pem")
    monkeypatch.setenv("DB_SSLCERT", "/run/secrets/client.crt")
    monkeypatch.setenv("DB_SSLKEY", "/run/secrets/client.key")
    assert get_settings().tls == {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/certs/db-ca.pem",
        "sslcert": "/run/secrets/client.crt",
        "sslkey": "/run/secrets/client.key",
    }
    # With DATABASE_URL they fill in what its query does not say, as PGSSLMODE does for libpq.
    monkeypatch.setenv("DATABASE_URL", PROVIDER_URL)
    assert get_settings().tls["sslmode"] == "require"
    assert get_settings().tls["sslrootcert"] == "/etc/ssl/certs/db-ca.pem"


def test_no_tls_settings_leave_the_drivers_default() -> None:
    assert get_settings().tls == {}
    url = get_settings(database_url="postgresql://app@/app?host=/run/postgresql").url
    assert url.query == {"host": "/run/postgresql"}


def test_the_migration_url_defaults_to_the_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://shop_app:hunter2@db/shop")
    settings = get_settings()
    assert settings.migration_database_url is None
    assert settings.migration_url == settings.url
    assert settings.for_migrations().url == settings.url


def test_migration_database_url_is_used_for_migrations_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://shop_app:hunter2@db/shop")
    monkeypatch.setenv(
        "MIGRATION_DATABASE_URL", "postgres://shop_migrator:s3cret@db/shop?sslmode=require"
    )
    monkeypatch.setenv("DATABASE_DRIVER", "psycopg")
    settings = get_settings()
    assert str(settings.url) == "postgresql+psycopg://shop_app:***@db/shop"
    assert str(settings.migration_url) == "postgresql+psycopg://shop_migrator:***@db/shop"
    assert settings.migration_url.password == "s3cret"
    migrating = settings.for_migrations()
    assert migrating.url == settings.migration_url
    assert migrating.tls == {"sslmode": "require"}  # the migration URL's own TLS parameters
    assert settings.tls == {}
    assert migrating.db_pool_size == settings.db_pool_size  # everything else as the app's


def test_migration_database_url_from_the_parts_and_an_empty_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "")
    assert get_settings().migration_database_url is None
    settings = get_settings(migration_database_url="postgresql://migrator:hunter2@db/app")
    assert settings.url.username == "postgres"  # the app: POSTGRES_* parts
    assert settings.migration_url.username == "migrator"


def test_the_migration_password_is_hidden_everywhere() -> None:
    settings = get_settings(migration_database_url="postgresql://migrator:hunter2@db/app")
    for text in (
        repr(settings),
        str(settings),
        str(settings.migration_url),
        repr(settings.migration_url),
        repr(settings.for_migrations()),
    ):
        assert "hunter2" not in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mysql://u:hunter2@h/db", "MIGRATION_DATABASE_URL: unsupported 'mysql'"),
        ("postgresql://u:hunter2@@h/db", "MIGRATION_DATABASE_URL: unescaped '@' in the password"),
        ("postgresql://u:hunter2@h", "MIGRATION_DATABASE_URL: no database name"),
        ("postgresql://u:hunter2@h/db?ssl=1", "MIGRATION_DATABASE_URL: unknown parameter 'ssl'"),
    ],
)
def test_a_bad_migration_url_is_one_line_without_the_password(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        get_settings(migration_database_url=value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_migrations_run_without_the_apps_timeouts() -> None:
    """The app's statement, lock and idle timeouts would cancel a long backfill or an index build
    on every deploy: migrations set their own `lock_timeout` per revision instead."""
    settings = get_settings(
        db_statement_timeout=0.001, db_lock_timeout=0.5, db_idle_in_transaction_timeout=60
    )
    for migrating in (
        settings.for_migrations(),
        settings.model_copy(
            update={"migration_database_url": SecretStr("postgresql://m:hunter2@db/app")}
        ).for_migrations(),
    ):
        assert migrating.db_statement_timeout is None
        assert migrating.db_lock_timeout is None
        assert migrating.db_idle_in_transaction_timeout is None
    assert settings.db_statement_timeout == 0.001  # the app's own are kept


def test_migrations_keep_the_check_that_the_client_is_still_there() -> None:
    """It stops nothing a live client runs: only a statement whose client is gone (a deploy
    killed mid-migration would otherwise leave its ALTER running, its lock held)."""
    settings = get_settings(db_client_connection_check_interval=1)
    assert settings.for_migrations().db_client_connection_check_interval == 1


VERIFIED = "postgresql://shop_app:hunter2@db/shop?sslmode=verify-full&sslrootcert=/ca.crt"


def test_the_migration_url_inherits_the_apps_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The most powerful login must not fall back to `prefer` because its URL says nothing."""
    monkeypatch.setenv("DATABASE_URL", VERIFIED)
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "postgresql://shop_migrator:s3cret@db/shop")
    monkeypatch.setenv("DB_SSLCERT", "/client.crt")
    assert get_settings().for_migrations().tls == {
        "sslmode": "verify-full",
        "sslrootcert": "/ca.crt",
        "sslcert": "/client.crt",
    }


def test_the_migration_urls_own_tls_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", VERIFIED)
    monkeypatch.setenv(
        "MIGRATION_DATABASE_URL", "postgresql://shop_migrator:s3cret@db/shop?sslmode=require"
    )
    assert get_settings().for_migrations().tls == {"sslmode": "require"}


def test_a_bad_migration_url_hint_names_its_own_variable() -> None:
    with pytest.raises(SettingsError) as caught:
        get_settings(migration_database_url="postgresql://u:hunter2@@h/db")
    assert "POSTGRES_PASSWORD" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        get_settings(database_url="postgresql://u:hunter2@@h/db")
    assert str(caught.value) == (
        "DATABASE_URL: unescaped '@' in the password; write %40 or use POSTGRES_PASSWORD"
    )


@pytest.mark.parametrize(
    ("timeout", "server_name"),
    [
        ("db_statement_timeout", "statement_timeout"),
        ("db_lock_timeout", "lock_timeout"),
        ("db_idle_in_transaction_timeout", "idle_in_transaction_session_timeout"),
        ("db_client_connection_check_interval", "client_connection_check_interval"),
    ],
)
def test_external_pooler_refuses_the_settings_sent_at_connect(
    timeout: str, server_name: str
) -> None:
    """PgBouncer refuses them as startup parameters ("unsupported startup parameter"), and with
    `ignore_startup_parameters` it would drop them silently: said once, at start, in one line,
    with the server setting to use instead."""
    with pytest.raises(SettingsError) as caught:
        get_settings(database_url="postgresql://u:p@h/db", db_external_pooler=True, **{timeout: 5})
    assert str(caught.value) == (
        f"DB_EXTERNAL_POOLER: PgBouncer refuses {timeout.upper()} (sent as a startup parameter); "
        f"set it on the server instead: ALTER ROLE … SET {server_name}"
    )
    assert get_settings(db_external_pooler=True).db_external_pooler
    assert get_settings(**{timeout: 5}).for_migrations().db_external_pooler is False


def test_no_replica_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_REPLICA_URL", "")  # an empty line in .env: none either
    assert get_settings().for_replica() is None


def test_the_replica_url_inherits_the_apps_tls_and_keeps_its_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", VERIFIED)
    monkeypatch.setenv("DATABASE_REPLICA_URL", "postgresql://shop_app:hunter2@replica/shop")
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "5")
    replica = get_settings().for_replica()
    assert replica is not None
    assert str(replica.url) == "postgresql+asyncpg://shop_app:***@replica/shop"
    assert replica.url.password == "hunter2"
    assert replica.tls == {"sslmode": "verify-full", "sslrootcert": "/ca.crt"}
    assert replica.db_statement_timeout == 5  # the app's: the reads are the app's
    for text in (repr(get_settings()), str(get_settings()), repr(replica), str(replica.url)):
        assert "hunter2" not in text
    monkeypatch.setenv("DATABASE_REPLICA_URL", "postgresql://u:p@replica/shop?sslmode=require")
    own = get_settings().for_replica()
    assert own is not None
    assert own.tls == {"sslmode": "require"}


def test_a_bad_replica_url_is_one_line_without_the_password() -> None:
    with pytest.raises(SettingsError) as caught:
        get_settings(database_replica_url="postgresql://u:hunter2@@h/db")
    assert "DATABASE_REPLICA_URL: unescaped '@' in the password" in str(caught.value)
    assert "hunter2" not in str(caught.value)
