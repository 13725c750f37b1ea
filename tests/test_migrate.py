"""The migrations: they go down and up to the same catalog, and fail cleanly. pytest-alembic's
built-in tests (single head, upgrade, models match the DDL, up/down) run in test_alembic_env.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from dblayer.engine import create_engine
from dblayer.migrate import (
    FIND_MIGRATOR,
    MIGRATION_LOCK,
    MIGRATIONS,
    MigrationLockTimeout,
    Upgrade,
    alembic_config,
    current_revision,
    downgrade_to,
    head_revision,
    upgrade_to_head,
    upgrade_with_lock,
)
from dblayer.settings import Driver, get_settings
from tests.databases import Databases
from tests.paths import ROOT

# The migration lock held in this test's database (parallel tests migrate their own databases).
HELD = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    " AND classid = 0 AND objid = :key AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)

# The catalog's view of the schema, Alembic's own bookkeeping table left out.
SCHEMA = text(
    """
    SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' '
           || is_nullable || ' ' || coalesce(column_default, '')
      FROM information_schema.columns
     WHERE table_schema = 'public' AND table_name <> 'alembic_version'
    UNION ALL SELECT 'index', indexdef FROM pg_indexes
     WHERE schemaname = 'public' AND tablename <> 'alembic_version'
    UNION ALL SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid)
      FROM pg_constraint
     WHERE connamespace = 'public'::regnamespace
       AND conrelid::regclass::text <> 'alembic_version'  -- also its NOT NULL on PostgreSQL 18
    UNION ALL SELECT 'type', t.typname || ' '
           || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
      FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname
    ORDER BY 1, 2
    """
)


async def test_the_test_databases_are_at_head(engine: AsyncEngine) -> None:
    assert await current_revision(engine) == head_revision()


async def test_every_revision_steps_down_and_up(engine: AsyncEngine) -> None:
    """Each revision's downgrade undoes its upgrade: step down one at a time, then up again, to the
    same catalog each time (pytest-alembic's up/down test checks that each step runs, not this)."""
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    schemas = {}
    for revision in revisions:
        schemas[revision] = await _schema(engine)
        await downgrade_to(engine, "-1")
    assert await current_revision(engine) is None
    for revision in reversed(revisions):
        await upgrade_to_head(engine, "+1")
        assert await current_revision(engine) == revision
        assert await _schema(engine) == schemas[revision]


async def _schema(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        return [(kind, item) for kind, item in (await conn.execute(SCHEMA)).all()]


async def test_down_to_base_and_up_again_leaves_the_same_schema(engine: AsyncEngine) -> None:
    before = await _schema(engine)
    await downgrade_to(engine)
    assert await _schema(engine) == []  # no table, index or enum type left behind
    assert await current_revision(engine) is None
    await upgrade_to_head(engine)
    assert await _schema(engine) == before
    assert await current_revision(engine) == head_revision()


def test_offline_mode_prints_the_sql(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db.invalid/app")
    command.upgrade(alembic_config(), "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TYPE user_role AS ENUM ('USER', 'ADMIN', 'SUPER_ADMIN');" in sql
    assert "CREATE TABLE users (" in sql
    assert "hunter2" not in sql


def test_the_command_line_path_runs_on_its_own_event_loop(
    monkeypatch: pytest.MonkeyPatch, database_url: URL
) -> None:
    """`alembic downgrade`/`upgrade` from a shell: no connection handed in, settings from env."""
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    ini = Config(str(ROOT / "alembic.ini"))  # as `alembic` does
    command.downgrade(ini, "base")
    command.upgrade(ini, "head")
    command.check(ini)  # raises when the models and the database differ


def test_the_command_line_path_migrates_on_the_migration_url(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    """With MIGRATION_DATABASE_URL set, `alembic` connects there, not to DATABASE_URL (here one
    that nothing answers on); offline SQL needs neither to answer."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/app")
    monkeypatch.setenv("MIGRATION_DATABASE_URL", database_url.render_as_string(hide_password=False))
    ini = Config(str(ROOT / "alembic.ini"))
    command.downgrade(ini, "base")
    command.upgrade(ini, "head")
    command.upgrade(ini, "head", sql=True)
    assert "CREATE TABLE users (" in capsys.readouterr().out
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "postgresql://migrator:hunter2@127.0.0.1:1/app")
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    with pytest.raises(CommandError, match=r"cannot connect to 127\.0\.0\.1:1/app"):
        command.upgrade(ini, "head")


def test_an_unreachable_database_is_one_line_naming_host_and_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:1/app")
    with pytest.raises(CommandError) as caught:
        command.upgrade(alembic_config(), "head")
    assert str(caught.value) == (
        "cannot connect to 127.0.0.1:1/app: connection refused; is the server running on that port?"
    )


FAILING_REVISION = '''\
"""a revision that fails half-way"""

import sqlalchemy as sa
from alembic import op

revision = "fails"
down_revision = "{head}"


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("SELECT no_such_function()")


def downgrade() -> None:
    op.drop_table("half_done")
'''


async def test_a_failing_revision_leaves_the_previous_one(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """PostgreSQL's DDL is transactional: the half-created table goes with the rollback."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "fails.py").write_text(FAILING_REVISION.format(head=head_revision()))

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.set_main_option("script_location", str(scripts))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    with pytest.raises(Exception, match="no_such_function"):
        async with engine.connect() as conn:
            await conn.run_sync(upgrade)
    assert await current_revision(engine) == head_revision()
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT to_regclass('half_done')")) is None


async def test_upgrade_with_lock_reports_what_it_did(engine: AsyncEngine) -> None:
    await downgrade_to(engine, "0002")
    assert await upgrade_with_lock(engine) == Upgrade("0002", head_revision())
    nothing = await upgrade_with_lock(engine)
    assert nothing == Upgrade(head_revision(), head_revision())
    assert not nothing.ran
    async with engine.begin() as conn:  # a newer release's revision: left alone, no error
        await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    assert await upgrade_with_lock(engine) == Upgrade("f00dfeedbeef", "f00dfeedbeef")
    async with engine.connect() as conn:  # released: nobody holds it any more
        assert await conn.scalar(text(HELD), {"key": MIGRATION_LOCK}) == 0


async def test_a_held_lock_is_waited_for_then_one_clear_error(engine: AsyncEngine) -> None:
    """A stuck migrator (here: this test's session holding the lock) does not hang the others."""
    await downgrade_to(engine, "0002")
    async with engine.connect() as stuck:
        await stuck.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        await stuck.commit()
        with pytest.raises(MigrationLockTimeout) as caught:
            await upgrade_with_lock(engine, wait=0.3)
        async with engine.connect() as conn:  # the query the message gives finds the holder
            pids = (await conn.execute(text(FIND_MIGRATOR))).scalars().all()
            assert pids == [await stuck.scalar(text("SELECT pg_backend_pid()"))]
        await stuck.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        await stuck.commit()
    assert str(caught.value) == (
        "another migration has held the migration lock for more than 0.3 s; find it with: "
        + FIND_MIGRATOR
    )
    assert await current_revision(engine) == "0002"
    assert (await upgrade_with_lock(engine, wait=0.3)).ran


async def test_a_migrator_in_another_database_is_not_this_ones(
    engine: AsyncEngine, databases: Databases, driver: Driver
) -> None:
    """Advisory locks are per database: another database's migrator on the same server neither
    blocks this upgrade nor shows up in the query the timeout's message gives."""
    other = databases.clone(empty=True)
    elsewhere = create_engine(
        get_settings(
            database_url=databases.url(other, driver).render_as_string(hide_password=False)
        )
    )
    try:
        async with elsewhere.connect() as stuck:
            await stuck.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            await stuck.commit()
            async with engine.connect() as conn:
                assert (await conn.execute(text(FIND_MIGRATOR))).all() == []
            await downgrade_to(engine, "0002")
            assert (await upgrade_with_lock(engine, wait=0.3)).ran
    finally:
        await elsewhere.dispose()
        databases.drop(other)


async def test_a_failing_revision_releases_the_lock(engine: AsyncEngine, tmp_path: Path) -> None:
    """The lock is released after a failure too (the connection may go back to the pool)."""
    await downgrade_to(engine, "0002")
    async with engine.begin() as conn:  # two live users whose emails differ only in case
        for email, username in (("Ada@x.org", "ada"), ("ada@x.org", "ada2")):
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, username, hashed_password)"
                    " VALUES (gen_random_uuid(), :e, :u, 'x')"
                ),
                {"e": email, "u": username},
            )
    with pytest.raises(CommandError, match="differ only in case"):
        await upgrade_with_lock(engine)
    async with engine.connect() as conn:
        assert await conn.scalar(text(HELD), {"key": MIGRATION_LOCK}) == 0


async def test_the_lock_ends_with_the_session_that_held_it(engine: AsyncEngine) -> None:
    """A migrator that dies (its connection closed, here) leaves no lock behind."""
    await downgrade_to(engine, "0002")
    async with engine.connect() as dying:
        await dying.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        await dying.commit()
        await dying.invalidate()  # the session ends without unlocking
    assert (await upgrade_with_lock(engine, wait=5)).ran
