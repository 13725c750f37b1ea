"""The migrator and app roles (`dblayer.roles`): the app reads and writes rows and nothing more,
the migrator owns the schema and runs the migrations, and tables it makes later reach the app.

Roles belong to the whole server: each test names them after its own database, and the harness
drops this run's roles with its databases (tests/databases.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from dblayer import roles
from dblayer.api import create_app
from dblayer.engine import create_engine
from dblayer.migrate import current_revision, downgrade_to, head_revision, upgrade_to_head
from dblayer.repositories import TaskRepository
from dblayer.services import UserService
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import Driver, get_settings
from dblayer.testing import connect
from tests.apps import client_for, new_user, settings_for
from tests.databases import Databases

MIGRATOR_PASSWORD = "m1grat0r'; DROP ROLE x; --"  # quoted by psycopg, hashed by libpq
APP_PASSWORD = "app p@ss:w/rd%20#?"


async def make_roles(database_url: URL) -> tuple[URL, URL]:
    """Both roles on this test's database, named after it; their URLs (migrator, app)."""
    name = database_url.database
    await roles.create_roles(
        settings_for(database_url),
        migrator=f"{name}_migrator",
        app=f"{name}_app",
        migrator_password=MIGRATOR_PASSWORD,
        app_password=APP_PASSWORD,
    )
    return (
        database_url.set(username=f"{name}_migrator", password=MIGRATOR_PASSWORD),
        database_url.set(username=f"{name}_app", password=APP_PASSWORD),
    )


@pytest.fixture
async def role_engines(database_url: URL) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    migrator_url, app_url = await make_roles(database_url)
    migrator = create_engine(settings_for(migrator_url))
    app = create_engine(settings_for(app_url))
    yield migrator, app
    await migrator.dispose()
    await app.dispose()


def _sqlstate(error: DBAPIError) -> str | None:
    code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return str(code) if code else None


async def test_the_app_role_reads_and_writes_rows_and_nothing_more(
    role_engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    _, app = role_engines
    async with session_scope(create_sessionmaker(app)) as session:
        user = await UserService(session).create(
            email="ada@example.com", username="ada", password="correct horse"
        )
        await TaskRepository(session).bulk_create([{"title": "write", "user_id": user.id}])
    async with session_scope(create_sessionmaker(app)) as session:
        assert await TaskRepository(session).count() == 1
    for statement in (
        "DROP TABLE tasks",
        "ALTER TABLE users ADD COLUMN nickname text",
        "TRUNCATE tasks",
        "CREATE TABLE mine (id int)",
    ):
        async with app.connect() as conn:
            with pytest.raises(DBAPIError) as caught:
                await conn.execute(text(statement))
        assert _sqlstate(caught.value) == "42501", statement
        assert "permission denied" in str(caught.value) or "must be owner" in str(caught.value)


async def test_the_migrator_owns_the_schema_and_its_later_tables_reach_the_app(
    role_engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    migrator, app = role_engines
    await downgrade_to(migrator, "0002")  # it owns what the administrator had migrated
    await upgrade_to_head(migrator)
    assert await current_revision(migrator) == head_revision()
    async with migrator.begin() as conn:
        await conn.execute(text("CREATE TABLE audit_log (id bigserial PRIMARY KEY, event text)"))
    async with app.begin() as conn:  # default privileges: the table and its sequence
        await conn.execute(text("INSERT INTO audit_log (event) VALUES ('deploy')"))
        assert await conn.scalar(text("SELECT count(*) FROM audit_log")) == 1
    with pytest.raises(DBAPIError) as caught:
        await downgrade_to(app, "0002")  # the app cannot migrate
    assert _sqlstate(caught.value) == "42501"


async def test_a_table_made_by_another_role_does_not_reach_the_app(
    role_engines: tuple[AsyncEngine, AsyncEngine], engine: AsyncEngine
) -> None:
    """Default privileges hold for tables the migrator makes: one made by the administrator (a
    migration run on the wrong URL) is refused to the app until granted."""
    _, app = role_engines
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE by_admin (id int)"))
    async with app.connect() as conn:
        with pytest.raises(DBAPIError) as caught:
            await conn.execute(text("SELECT * FROM by_admin"))
    assert _sqlstate(caught.value) == "42501"
    assert "permission denied for table by_admin" in str(caught.value)


async def test_running_it_again_sets_the_passwords_and_changes_nothing_else(
    database_url: URL,
) -> None:
    await make_roles(database_url)
    name = database_url.database
    lines = await roles.create_roles(
        settings_for(database_url),
        migrator=f"{name}_migrator",
        app=f"{name}_app",
        migrator_password="new migrator password",
        app_password="new app password",
    )
    assert lines[:3] == [
        "migrator: existed, password set",
        "app: existed, password set",
        "migrator: owns the tables and types of schema public (0 given to it now)",
    ]
    with connect(database_url.set(drivername="postgresql")) as admin:
        rows = admin.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname IN (%s, %s)",
            (f"{name}_migrator", f"{name}_app"),
        ).fetchall()
    assert len(rows) == 2
    assert all(str(row[0]).startswith("SCRAM-SHA-256$4096:") for row in rows)  # as stored


async def test_the_asgi_app_served_as_the_app_role(
    role_engines: tuple[AsyncEngine, AsyncEngine], database_url: URL
) -> None:
    _, app_engine = role_engines
    app_url = app_engine.url.set(drivername=database_url.drivername)
    app = create_app(settings_for(app_url))
    async for client in client_for(app):
        user = await new_user(client)
        response = await client.post("/tasks", json={"title": "ship", "user_id": user["id"]})
        assert response.status_code == 201, response.text
        assert (await client.get("/ready")).status_code == 200
        assert len((await client.get("/tasks")).json()["items"]) == 1


def test_the_command_line_names_the_roles_after_the_database(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    monkeypatch.setenv("MIGRATOR_PASSWORD", MIGRATOR_PASSWORD)
    monkeypatch.setenv("APP_PASSWORD", APP_PASSWORD)
    assert roles.main([]) == 0
    out, err = capsys.readouterr()
    name = database_url.database
    assert out.splitlines()[:2] == ["migrator: created", "app: created"]
    with connect(database_url.set(drivername="postgresql")) as admin:
        found = admin.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY 1", (f"{name}\\_%",)
        ).fetchall()
    assert found == [(f"{name}_app",), (f"{name}_migrator",)]
    assert MIGRATOR_PASSWORD not in out + err
    assert APP_PASSWORD not in out + err
    # The app role is no administrator: it may not make roles.
    app_url = database_url.set(username=f"{name}_app", password=APP_PASSWORD)
    monkeypatch.setenv("DATABASE_URL", app_url.render_as_string(hide_password=False))
    assert roles.main(["--migrator", f"{name}_m2", "--app", f"{name}_a2"]) == 1
    err = capsys.readouterr().err
    assert err == "roles: permission denied to create role (SQLSTATE 42501)\n"


def test_the_command_line_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://admin:hunter2@127.0.0.1:1/app")
    assert roles.main([]) == 1
    assert capsys.readouterr().err == (
        "roles: set MIGRATOR_PASSWORD and APP_PASSWORD in the environment\n"
    )
    monkeypatch.setenv("MIGRATOR_PASSWORD", "m")
    monkeypatch.setenv("APP_PASSWORD", "a")
    assert roles.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("roles: cannot connect to 127.0.0.1:1/app: connection refused")
    assert err.count("\n") == 1
    assert "hunter2" not in err
    assert get_settings().migration_database_url is None


def _as_a_non_superuser_owner(database_url: URL, *, public_as_on_pg14: bool) -> URL:
    """The database handed over to a role that owns it without being a superuser (a cloud
    provider's admin user); with `public_as_on_pg14`, schema public as PostgreSQL 14 left it:
    owned by the bootstrap superuser, CREATE granted to PUBLIC."""
    owner = f"{database_url.database}_owner"
    with connect(database_url.set(drivername="postgresql")) as admin:
        superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if superuser.fetchone() != (True,):
            pytest.skip("needs a superuser to hand the database over")
        admin.execute(f"CREATE ROLE \"{owner}\" LOGIN CREATEROLE PASSWORD 'owner'")
        admin.execute(f'ALTER DATABASE "{database_url.database}" OWNER TO "{owner}"')
        for table in ("users", "tasks", "jobs", "alembic_version"):
            admin.execute(f'ALTER TABLE {table} OWNER TO "{owner}"')
        for enum in ("user_role", "task_status", "job_status"):
            admin.execute(f'ALTER TYPE {enum} OWNER TO "{owner}"')
        if public_as_on_pg14:
            admin.execute("ALTER SCHEMA public OWNER TO CURRENT_USER")
            admin.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        else:
            admin.execute("ALTER SCHEMA public OWNER TO pg_database_owner")
    return database_url.set(username=owner, password="owner")


async def test_the_database_s_owner_need_not_be_a_superuser(
    database_url: URL,
) -> None:
    owner_url = _as_a_non_superuser_owner(database_url, public_as_on_pg14=False)
    migrator_url, app_url = await make_roles(owner_url)
    migrator = create_engine(settings_for(migrator_url))
    app = create_engine(settings_for(app_url))
    try:
        await downgrade_to(migrator, "0002")
        await upgrade_to_head(migrator)
        async with app.connect() as conn:
            for statement in ("DROP TABLE tasks", "CREATE TABLE mine (id int)"):
                with pytest.raises(DBAPIError) as caught:
                    await conn.execute(text(statement))
                assert _sqlstate(caught.value) == "42501"
                await conn.rollback()
    finally:
        await migrator.dispose()
        await app.dispose()


async def test_a_public_schema_it_cannot_revoke_create_on_is_refused(
    database_url: URL,
) -> None:
    """PostgreSQL 14 and older grant CREATE on public to every role, and only the schema's
    owner (there, the bootstrap superuser) can revoke it: the roles are not made at all."""
    owner_url = _as_a_non_superuser_owner(database_url, public_as_on_pg14=True)
    with pytest.raises(roles.RolesError) as caught:
        await make_roles(owner_url)
    assert str(caught.value) == (
        "the app role could still create tables in schema public: PUBLIC has CREATE there "
        "(PostgreSQL 14 and older grant it) and only the schema's owner or a superuser may "
        "revoke it; run this as one of them"
    )
    with connect(database_url.set(drivername="postgresql")) as admin:
        found = admin.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname IN (%s, %s)",
            (f"{owner_url.database}_migrator", f"{owner_url.database}_app"),
        ).fetchone()
    assert found == (0,)  # one transaction: nothing half-made


def test_the_command_line_says_it_in_one_line(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    owner_url = _as_a_non_superuser_owner(database_url, public_as_on_pg14=True)
    monkeypatch.setenv("DATABASE_URL", owner_url.render_as_string(hide_password=False))
    monkeypatch.setenv("MIGRATOR_PASSWORD", "m")
    monkeypatch.setenv("APP_PASSWORD", "a")
    assert roles.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("roles: the app role could still create tables in schema public:")
    assert err.count("\n") == 1


async def test_the_app_role_reads_the_version_table_and_may_not_change_it(
    role_engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """`/ready` reads alembic_version; rewriting it would make `alembic` skip or repeat
    migrations. The migrator still migrates afterwards."""
    migrator, app = role_engines
    for statement in (
        "UPDATE alembic_version SET version_num = 'tampered'",
        "DELETE FROM alembic_version",
        "INSERT INTO alembic_version VALUES ('tampered')",
        "TRUNCATE alembic_version",
    ):
        async with app.connect() as conn:
            with pytest.raises(DBAPIError) as caught:
                await conn.execute(text(statement))
        assert _sqlstate(caught.value) == "42501", statement
    assert await current_revision(app) == head_revision()
    await downgrade_to(migrator, "0002")
    await upgrade_to_head(migrator)
    assert await current_revision(app) == head_revision()


async def test_on_an_empty_database_the_version_table_is_made_first(
    databases: Databases, driver: Driver
) -> None:
    """Before the first `alembic upgrade`: default privileges would grant the app every row
    of the version table the migrator then creates, so `create_roles` makes it, as Alembic
    would, and the migrator's upgrade takes it as it is."""
    name = databases.clone(empty=True)
    try:
        migrator_url, app_url = await make_roles(databases.url(name, driver))
        migrator = create_engine(settings_for(migrator_url))
        app = create_engine(settings_for(app_url))
        try:
            await upgrade_to_head(migrator)
            await downgrade_to(migrator, "base")
            await upgrade_to_head(migrator)
            assert await current_revision(app) == head_revision()
            async with app.connect() as conn:
                with pytest.raises(DBAPIError) as caught:
                    await conn.execute(text("UPDATE alembic_version SET version_num = 'x'"))
            assert _sqlstate(caught.value) == "42501"
        finally:
            await migrator.dispose()
            await app.dispose()
    finally:
        databases.drop(name)


async def test_an_existing_role_loses_powers_it_should_not_have(database_url: URL) -> None:
    name = database_url.database
    with connect(database_url.set(drivername="postgresql")) as admin:
        admin.execute(f'CREATE ROLE "{name}_app" LOGIN CREATEDB CREATEROLE BYPASSRLS REPLICATION')
        admin.execute(f'CREATE ROLE "{name}_migrator" LOGIN CREATEDB CREATEROLE')
    await make_roles(database_url)
    with connect(database_url.set(drivername="postgresql")) as admin:
        found = admin.execute(
            "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication"
            " FROM pg_roles WHERE rolname IN (%s, %s) ORDER BY 1",
            (f"{name}_app", f"{name}_migrator"),
        ).fetchall()
    assert found == [
        (f"{name}_app", False, False, False, False, False),
        (f"{name}_migrator", False, False, False, False, False),
    ]


@pytest.mark.parametrize("who", ["same", "current_user", "owner"])
async def test_an_app_role_that_is_the_migrator_or_the_administrator_is_refused(
    database_url: URL, who: str
) -> None:
    name = database_url.database
    settings = settings_for(database_url)
    app = {"same": f"{name}_migrator", "current_user": database_url.username}.get(who)
    if who == "owner":
        app = f"{name}_owner"
        with connect(database_url.set(drivername="postgresql")) as admin:
            admin.execute(f'CREATE ROLE "{app}"')
            admin.execute(f'ALTER DATABASE "{name}" OWNER TO "{app}"')
    with pytest.raises(roles.RolesError) as caught:
        await roles.create_roles(
            settings,
            migrator=f"{name}_migrator",
            app=str(app),
            migrator_password="m",
            app_password="a",
        )
    expected = {
        "same": "the app role must not be the migrator: name two different roles",
        "current_user": f"the app role must not be {app}, the role this runs as: name another",
        "owner": f"the app role must not be {app}, the database's owner: name another",
    }
    assert str(caught.value) == expected[who]


async def test_the_migrator_may_not_be_the_administrator(database_url: URL) -> None:
    with pytest.raises(roles.RolesError) as caught:
        await roles.create_roles(
            settings_for(database_url),
            migrator=str(database_url.username),
            app=f"{database_url.database}_app",
            migrator_password="m",
            app_password="a",
        )
    assert str(caught.value) == (
        f"the migrator must not be {database_url.username}, the role this runs as: name another"
    )


async def test_a_schema_named_in_mixed_case_is_adopted(database_url: URL) -> None:
    with connect(database_url.set(drivername="postgresql")) as admin:
        admin.execute('CREATE SCHEMA "MySchema"')
        admin.execute('CREATE TABLE "MySchema"."Notes" (id int)')
    name = database_url.database
    lines = await roles.create_roles(
        settings_for(database_url),
        migrator=f"{name}_migrator",
        app=f"{name}_app",
        migrator_password="m",
        app_password="a",
        schema="MySchema",
    )
    assert lines[2] == "migrator: owns the tables and types of schema MySchema (2 given to it now)"


async def test_the_administrator_stays_a_member_of_the_migrator(database_url: URL) -> None:
    """Granted so that it may give objects to the migrator and set its default privileges, and
    kept: running `create_roles` again needs it, and it is what an administrator may do anyway."""
    await make_roles(database_url)
    with connect(database_url.set(drivername="postgresql")) as admin:
        member = admin.execute(
            "SELECT pg_has_role(current_user, %s, 'MEMBER')", (f"{database_url.database}_migrator",)
        ).fetchone()
    assert member == (True,)


async def test_the_statement_sent_holds_the_hash_not_the_password(database_url: URL) -> None:
    """What the server receives, and may log: the statement `create_roles` executes, as text."""
    async with await roles._connect(settings_for(database_url)) as conn:
        statement = roles.login_role_statement(conn, "someone", APP_PASSWORD, exists=False)
        sent = statement.as_string(conn)
    assert APP_PASSWORD not in sent
    assert APP_PASSWORD.replace("'", "''") not in sent
    assert sent.startswith('CREATE ROLE "someone" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    assert "PASSWORD 'SCRAM-SHA-256$4096:" in sent
