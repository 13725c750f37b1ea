"""`python -m dblayer.roles`: a production database's two login roles, made by an administrator.

* the **migrator** owns the schema's tables and types: pre-start and `alembic` log in as it
  (`MIGRATION_DATABASE_URL`);
* the **app** reads and writes rows and nothing else (no DDL, no TRUNCATE), and only reads
  `alembic_version`: the app logs in as it (`DATABASE_URL`). `ALTER DEFAULT PRIVILEGES` grants it
  the tables the migrator makes later.

Neither role keeps a cluster-wide power (SUPERUSER, CREATEDB, CREATEROLE, BYPASSRLS, REPLICATION),
even one it had before: the migrator needs only to own the schema's objects, and with any of
those it could reach past its grants (a superuser or BYPASSRLS past every one, CREATEROLE to
roles of its own). So neither may be the role this runs as, and the app may not be the database's
owner (who may always create in its schema). The administrator stays a member of the migrator:
it gives objects to it and sets its default privileges, now and whenever this runs again.

Run it as the database's owner or a superuser (the `DATABASE_URL` or `POSTGRES_*` settings), once
per database and again whenever you like: it changes only what differs. Not a migration: roles
belong to the whole server, not to one database, and a migration runs as the migrator, which may
not create roles. Passwords are hashed here by libpq (SCRAM-SHA-256, as psql's `\\password`
does), so the server's log and `pg_stat_activity` never see them in clear; they come from the
environment (`MIGRATOR_PASSWORD`, `APP_PASSWORD`), never from the command line, which `ps` shows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from dblayer.engine import describe_failure
from dblayer.settings import Settings, SettingsError, get_settings


class RolesError(RuntimeError):
    """The roles cannot be made as asked; one line. Nothing was changed (one transaction)."""


# --8<-- [start:grants]
# Who may create in the schema: the migrator, and nobody else.
SCHEMA_GRANTS = [
    "GRANT CONNECT ON DATABASE {database} TO {migrator}, {app}",
    "GRANT USAGE, CREATE ON SCHEMA {schema} TO {migrator}",
    "GRANT USAGE ON SCHEMA {schema} TO {app}",
    # Granted to every role up to PostgreSQL 14 (15 stopped); a no-op where it is not granted.
    "REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC",
]
# What the app may do with the schema's tables: rows in, rows out, nothing more.
TABLE_GRANTS = [
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {app}",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {app}",
]
# ... and the same for the tables and sequences the migrator creates from now on. Without these,
# every later migration's new table answers the app with "permission denied" (42501).
DEFAULT_PRIVILEGES = [
    "ALTER DEFAULT PRIVILEGES FOR ROLE {migrator} IN SCHEMA {schema}"
    " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}",
    "ALTER DEFAULT PRIVILEGES FOR ROLE {migrator} IN SCHEMA {schema}"
    " GRANT USAGE, SELECT ON SEQUENCES TO {app}",
]
# The version table, before the migrator's first `alembic upgrade` would make it (and default
# privileges would then grant the app its rows): Alembic's own DDL, which it takes as it is. In
# the schema given, where Alembic keeps it when that schema comes first on the search_path.
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS {schema}.alembic_version (version_num VARCHAR(32) NOT NULL,"
    " CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)
# The app reads it (`/ready`) and may not rewrite it: `alembic` would then skip or repeat
# migrations.
VERSION_TABLE_GRANTS = [
    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {schema}.alembic_version FROM {app}",
    "GRANT SELECT ON {schema}.alembic_version TO {app}",
]
# Cluster-wide powers, taken from both roles (see the module's docstring): pg_roles' columns.
POWERS = {
    "rolsuper": "SUPERUSER",
    "rolcreatedb": "CREATEDB",
    "rolcreaterole": "CREATEROLE",
    "rolbypassrls": "BYPASSRLS",
    "rolreplication": "REPLICATION",
}
# --8<-- [end:grants]

# --8<-- [start:adopt]
# Objects made before the migrator existed (by the administrator): given to it, so that later
# migrations can alter them. Sequences owned by a column follow their table; objects of an
# extension stay the extension's. Functions are left alone (ALTER FUNCTION … OWNER TO by hand).
OBJECTS_TO_ADOPT = """
SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                      WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, c.relname
FROM pg_class c
WHERE c.relnamespace = to_regnamespace(quote_ident(%(schema)s))  -- quoted: MySchema, not myschema
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND pg_get_userbyid(c.relowner) <> %(migrator)s
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))
UNION ALL
SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.typname
FROM pg_type t
WHERE t.typnamespace = to_regnamespace(quote_ident(%(schema)s)) AND t.typtype IN ('e', 'd')
  AND pg_get_userbyid(t.typowner) <> %(migrator)s
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                  AND d.objid = t.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""
# --8<-- [end:adopt]


# --8<-- [start:create_roles]
async def create_roles(
    settings: Settings,
    *,
    migrator: str,
    app: str,
    migrator_password: str,
    app_password: str,
    schema: str = "public",
) -> list[str]:
    """Create (or update) both roles on the database `settings` name, as its administrator, in
    one transaction; returns what it did, one line per step, without passwords."""
    async with await _connect(settings) as conn, conn.transaction():
        await _check_names(conn, migrator, app)
        lines = [
            f"migrator: {await _login_role(conn, migrator, migrator_password)}",
            f"app: {await _login_role(conn, app, app_password)}",
        ]
        names = {
            "database": sql.Identifier(settings.url.database or ""),
            "schema": sql.Identifier(schema),
            "migrator": sql.Identifier(migrator),
            "app": sql.Identifier(app),
        }
        # ALTER … OWNER TO and ALTER DEFAULT PRIVILEGES FOR ROLE need us to be a member of it.
        await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(names["migrator"]))
        for statement in SCHEMA_GRANTS:  # before OWNER TO: an owner needs CREATE on the schema
            await conn.execute(sql.SQL(statement).format(**names))
        await _check_schema(conn, app, schema)
        await conn.execute(sql.SQL(VERSION_TABLE).format(**names))
        cursor = await conn.execute(OBJECTS_TO_ADOPT, {"schema": schema, "migrator": migrator})
        adopted = await cursor.fetchall()
        for kind, name in adopted:
            await conn.execute(
                sql.SQL("ALTER {} {}.{} OWNER TO {}").format(
                    sql.SQL(kind), names["schema"], sql.Identifier(name), names["migrator"]
                )
            )
        for statement in TABLE_GRANTS + DEFAULT_PRIVILEGES + VERSION_TABLE_GRANTS:
            await conn.execute(sql.SQL(statement).format(**names))
    return [
        *lines,
        f"migrator: owns the tables and types of schema {schema} ({len(adopted)} given to it now)",
        "app: SELECT, INSERT, UPDATE, DELETE on them, and on the tables the migrator makes later",
        "app: only SELECT on alembic_version, which the migrator owns",
    ]


async def _check_schema(conn: psycopg.AsyncConnection[Any], app: str, schema: str) -> None:
    """REVOKE by someone who may not revoke is only a warning: check that it took."""
    cursor = await conn.execute("SELECT has_schema_privilege(%s, %s, 'CREATE')", (app, schema))
    if await cursor.fetchone() == (True,):
        raise RolesError(
            f"the app role could still create tables in schema {schema}: PUBLIC has CREATE there "
            "(PostgreSQL 14 and older grant it) and only the schema's owner or a superuser may "
            "revoke it; run this as one of them"
        )


async def _check_names(conn: psycopg.AsyncConnection[Any], migrator: str, app: str) -> None:
    """Refuse roles that would keep powers this takes from them: see the module's docstring."""
    cursor = await conn.execute(
        "SELECT current_user, pg_get_userbyid(datdba) FROM pg_database"
        " WHERE datname = current_database()"
    )
    current, owner = await cursor.fetchone() or ("", "")
    if app == migrator:
        raise RolesError("the app role must not be the migrator: name two different roles")
    for kind, role in (("the app role", app), ("the migrator", migrator)):
        if role == current:
            raise RolesError(f"{kind} must not be {role}, the role this runs as: name another")
    if app == owner:
        raise RolesError(f"the app role must not be {app}, the database's owner: name another")


async def _login_role(conn: psycopg.AsyncConnection[Any], role: str, password: str) -> str:
    """CREATE ROLE, or ALTER ROLE when it exists: LOGIN, the password, no cluster-wide power."""
    columns = sql.SQL(", ").join(map(sql.Identifier, POWERS))
    query = sql.SQL("SELECT {} FROM pg_roles WHERE rolname = %s").format(columns)
    held = await (await conn.execute(query, (role,))).fetchone()
    # Only the powers it has: naming one may need that power (SUPERUSER needs a superuser).
    powers = [power for power, has in zip(POWERS.values(), held or (), strict=False) if has]
    await conn.execute(
        login_role_statement(conn, role, password, exists=held is not None, powers=powers)
    )
    return "existed, password set" if held is not None else "created"


def login_role_statement(
    conn: psycopg.AsyncConnection[Any],
    role: str,
    password: str,
    *,
    exists: bool,
    powers: Iterable[str] = POWERS.values(),
) -> sql.Composed:
    """The statement sent: the password as libpq's SCRAM-SHA-256 hash (as psql's `\\password`
    sends it), so the server's log and `pg_stat_activity` never hold it in clear."""
    hashed = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    return sql.SQL("{} ROLE {} LOGIN {}PASSWORD {}").format(
        sql.SQL("ALTER" if exists else "CREATE"),
        sql.Identifier(role),
        sql.SQL("".join(f"NO{power} " for power in powers)),
        sql.Literal(hashed.decode()),
    )
    # --8<-- [end:create_roles]


async def _connect(settings: Settings) -> psycopg.AsyncConnection[Any]:
    """psycopg (libpq) whichever driver the app uses: libpq hashes the passwords."""
    url = settings.url
    options: dict[str, Any] = {
        "host": url.host or url.query.get("host"),  # `?host=/run/postgresql`: a socket directory
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        "connect_timeout": max(2, round(settings.db_connect_timeout)),
        **settings.tls,  # libpq's own sslmode, sslrootcert, …
    }
    return await psycopg.AsyncConnection.connect(**options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--migrator", help="the migrator's name (default: <database>_migrator)")
    parser.add_argument("--app", help="the app's role name (default: <database>_app)")
    parser.add_argument("--schema", default="public", help="the schema (public)")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        passwords = {
            name: os.environ.get(name, "") for name in ("MIGRATOR_PASSWORD", "APP_PASSWORD")
        }
        if missing := [name for name, value in passwords.items() if not value]:
            raise SettingsError(f"set {' and '.join(missing)} in the environment")
        database = settings.url.database
        lines = asyncio.run(
            create_roles(
                settings,
                migrator=args.migrator or f"{database}_migrator",
                app=args.app or f"{database}_app",
                migrator_password=passwords["MIGRATOR_PASSWORD"],
                app_password=passwords["APP_PASSWORD"],
                schema=args.schema,
            )
        )
    except (SettingsError, RolesError) as error:
        print(f"roles: {error}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as error:  # not connected: where, and why
        print(f"roles: {describe_failure(settings.url, error)}", file=sys.stderr)
        return 1
    except psycopg.Error as error:  # refused by the server: not an administrator, most likely
        message = (error.diag.message_primary or str(error)).splitlines()[0]
        print(f"roles: {message} (SQLSTATE {error.sqlstate})", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
