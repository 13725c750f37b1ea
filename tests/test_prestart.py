"""Pre-start and the served app: wait with retries, migrate, seed once; uvicorn over real HTTP."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import URL, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.pool import NullPool

from dblayer import prestart
from dblayer.embedded import EmbeddedPostgres, find_binaries, free_port
from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.migrate import head_revision
from dblayer.repositories import TaskRepository
from dblayer.services import UserService
from dblayer.session import session_scope
from dblayer.settings import Driver, get_settings
from dblayer.testing import connect
from tests.databases import Databases


def test_prestart_migrates_and_seeds_once(
    monkeypatch: pytest.MonkeyPatch,
    databases: Databases,
    driver: Driver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = databases.clone(empty=True)
    try:
        url = databases.url(name, driver).render_as_string(hide_password=False)
        monkeypatch.setenv("DATABASE_URL", url)
        assert prestart.main([]) == 0
        first = capsys.readouterr().out.splitlines()
        assert first[1:] == [
            f"migrations: upgraded from base to head ({head_revision()})",
            "seed: created (3 tasks)",
        ]
        assert first[0].startswith("database: PostgreSQL 1")
        assert prestart.main([]) == 0  # idempotent
        second = capsys.readouterr().out.splitlines()
        assert second[1] == f"migrations: at head ({head_revision()})"  # nothing to do
        assert second[2] == "seed: already there, nothing changed (3 tasks)"
    finally:
        databases.drop(name)


def test_prestart_migrates_on_the_migration_url(
    monkeypatch: pytest.MonkeyPatch, databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """MIGRATION_DATABASE_URL set: pre-start waits, migrates and seeds there; the app's URL (here
    one that nothing answers on) is not used."""
    name = databases.clone(empty=True)
    try:
        url = databases.url(name, "asyncpg").render_as_string(hide_password=False)
        monkeypatch.setenv("MIGRATION_DATABASE_URL", url)
        monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/app")
        assert prestart.main(["--timeout", "5"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1:] == [
            f"migrations: upgraded from base to head ({head_revision()})",
            "seed: created (3 tasks)",
        ]
    finally:
        databases.drop(name)


@pytest.mark.usefixtures("password_auth")
def test_wrong_password_fails_at_once_without_retrying(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", database_url.set(password="hunter2").render_as_string(hide_password=False)
    )
    started = time.monotonic()
    assert prestart.main(["--timeout", "30"]) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("prestart failed: cannot connect to 127.0.0.1:")
    assert "password authentication failed" in err
    assert "hunter2" not in err


def test_an_unreachable_database_is_retried_until_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/app")
    caplog.set_level(logging.WARNING, "dblayer.prestart")
    assert prestart.main(["--timeout", "1"]) == 1
    assert "connection refused" in capsys.readouterr().err
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2
    assert "hunter2" not in caplog.text


async def test_waiting_ends_when_the_server_comes_up(caplog: pytest.LogCaptureFixture) -> None:
    """A server that starts while we wait: the retries end with its version."""
    port = free_port()
    server = EmbeddedPostgres(find_binaries(), port=port)
    engine = create_engine(get_settings(database_url=f"postgresql://x:y@127.0.0.1:{port}/postgres"))
    caplog.set_level(logging.WARNING, "dblayer.prestart")
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        with pytest.raises(DatabaseUnavailableError, match="password authentication failed"):
            # The server is up, but these credentials are wrong: not transient, so no more retries.
            await prestart.wait_for_database(engine, max_wait=60)
        assert any("retrying in" in r.getMessage() for r in caplog.records)
        good = create_engine(
            get_settings(database_url=server.url().render_as_string(hide_password=False))
        )
        assert (await prestart.wait_for_database(good)).startswith(server.binaries.version)
        await good.dispose()
    finally:
        starter.join()
        await engine.dispose()
        server.stop()


async def test_seed_leaves_a_taken_demo_email_alone(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        await UserService(session).create(
            email="demo@example.com", username="someone", password="correct horse"
        )
        assert await prestart.seed(session) is False
        assert await TaskRepository(session).count() == 0


def test_prestart_of_an_older_release_leaves_a_newer_schema_alone(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rollback of the code, or a pod of the previous release starting during a rolling
    deploy: the database is at a revision this code does not know (a newer one). `/ready` calls
    that ready; pre-start must start the app too, not fail on `Can't locate revision`."""
    admin = database_url.set(drivername="postgresql+psycopg")
    with create_sync_engine(admin, poolclass=NullPool).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    assert prestart.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        f"migrations: at f00dfeedbeef, newer than this code's head {head_revision()}: left as it is"
    )
    assert lines[2] == "seed: created (3 tasks)"


REPLICAS = 4
# Each replica blocked: on a lock (the one inside its migration, or any, without the migration
# lock), or idle after a try at the migration lock found it taken (its last statement is the
# COMMIT after `pg_try_advisory_lock`; none before it in pre-start ends in COMMIT).
WAITING = """SELECT count(DISTINCT pid) FROM pg_stat_activity WHERE datname = %s
               AND (wait_event_type = 'Lock' OR (state = 'idle' AND query LIKE 'COMMIT%%'))"""


@pytest.mark.parametrize(
    "round_", [0, *(pytest.param(n, marks=pytest.mark.slow) for n in range(1, 5))]
)  # CI: five rounds
def test_replicas_starting_at_once_migrate_once(
    databases: Databases, driver: Driver, round_: int
) -> None:
    """Several replicas run pre-start at once against an empty database (alembic#633). Made
    deterministic: this test holds the first type revision 0001 creates, so every replica is
    blocked mid-way (the first inside its migration, the others behind it) before any goes on.
    Without a lock, the others then fail on a duplicate key in the catalog; with it, one
    migrates and the others wait, then find nothing to do."""
    name = databases.clone(empty=True)
    url = databases.url(name, driver)
    env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
    try:
        with connect(url) as holder:
            holder.execute("BEGIN")
            holder.execute("CREATE TYPE user_role AS ENUM ('USER')")
            replicas = [
                subprocess.Popen(
                    [sys.executable, "-m", "dblayer.prestart"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(REPLICAS)
            ]
            try:
                deadline = time.monotonic() + 60
                while databases.admin.execute(WAITING, (name,)).fetchone() != (REPLICAS,):
                    assert all(r.poll() is None for r in replicas), "a replica ended early"
                    assert time.monotonic() < deadline, "the replicas never all waited"
                    time.sleep(0.05)  # polling the server, not waiting for an outcome
            finally:
                holder.execute("ROLLBACK")
            results = [r.communicate(timeout=60) for r in replicas]
        failures = [err for (_, err), r in zip(results, replicas, strict=True) if r.returncode]
        assert [f.splitlines()[-4:] for f in failures] == []  # the error, not the log
        lines = sorted(out.splitlines()[1] for out, _ in results)
        assert lines == [f"migrations: at head ({head_revision()})"] * (REPLICAS - 1) + [
            f"migrations: upgraded from base to head ({head_revision()})"
        ]
    finally:
        databases.drop(name)


def test_prestart_migrates_without_the_apps_timeouts(
    monkeypatch: pytest.MonkeyPatch, databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """A statement timeout far too short for a migration is the app's, not pre-start's."""
    name = databases.clone(empty=True)
    try:
        url = databases.url(name, "psycopg").render_as_string(hide_password=False)
        monkeypatch.setenv("DATABASE_URL", url)
        for variable in ("DB_STATEMENT_TIMEOUT", "DB_LOCK_TIMEOUT"):
            monkeypatch.setenv(variable, "0.001")
        monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "0.001")
        assert prestart.main([]) == 0, capsys.readouterr().err
        migrated = f"migrations: upgraded from base to head ({head_revision()})"
        assert capsys.readouterr().out.splitlines()[1] == migrated
    finally:
        databases.drop(name)


def test_a_migration_the_server_refuses_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    databases: Databases,
    driver: Driver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A table the first migration would create is there already: SQLSTATE and the server's
    message, not a traceback, and never the password."""
    name = databases.clone(empty=True)
    try:
        url = databases.url(name, driver)
        with create_sync_engine(
            url.set(drivername="postgresql+psycopg"), poolclass=NullPool
        ).begin() as conn:
            conn.execute(text("CREATE TABLE users (id int)"))
        monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
        assert prestart.main([]) == 1
        err = capsys.readouterr().err
        assert err == 'prestart failed: relation "users" already exists (SQLSTATE 42P07)\n'
    finally:
        databases.drop(name)


def test_a_version_table_alembic_refuses_is_one_line(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = database_url.set(drivername="postgresql+psycopg")
    with create_sync_engine(admin, poolclass=NullPool).begin() as conn:
        conn.execute(text("INSERT INTO alembic_version VALUES ('f00dfeedbeef')"))
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    assert prestart.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("prestart failed: Version table 'alembic_version' has more than one")
    assert err.count("\n") == 1
