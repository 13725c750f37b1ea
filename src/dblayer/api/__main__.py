"""`python -m dblayer.api` (`make app`): pre-start, then serve the reference app with uvicorn.

The database is the one the settings name (`DATABASE_URL`, `POSTGRES_*`, `.env`); when they name
none, an embedded PostgreSQL is started for the app's lifetime and removed when it stops, with the
two roles of production: pre-start migrates as the migrator, the app is served as the app role.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator

import uvicorn

from dblayer import prestart
from dblayer.embedded import EmbeddedPostgres, find_binaries
from dblayer.roles import create_roles
from dblayer.settings import SettingsError, get_settings

MIGRATOR, APP = "dblayer_migrator", "dblayer_app"  # the embedded server's roles


@contextlib.contextmanager
def database() -> Iterator[str]:
    """Yield where the database is; start an embedded one when nothing is configured."""
    settings = get_settings()
    if settings.database_url is not None or "postgres_host" in settings.model_fields_set:
        yield f"configured: {settings.url}"  # str(URL) masks the password
        return
    with EmbeddedPostgres(find_binaries()) as server:
        # As in production: pre-start migrates as the migrator, the app reads and writes rows as
        # the app role (see docs/production-roles.md); throwaway passwords, like the server.
        admin = server.url("postgres", settings.database_driver)
        passwords = {role: secrets.token_urlsafe(24) for role in (MIGRATOR, APP)}
        asyncio.run(
            create_roles(
                get_settings(database_url=admin.render_as_string(hide_password=False)),
                migrator=MIGRATOR,
                app=APP,
                migrator_password=passwords[MIGRATOR],
                app_password=passwords[APP],
            )
        )
        for variable, role in (("MIGRATION_DATABASE_URL", MIGRATOR), ("DATABASE_URL", APP)):
            url = admin.set(username=role, password=passwords[role])
            os.environ[variable] = url.render_as_string(hide_password=False)
        try:
            yield (
                f"embedded PostgreSQL {server.binaries.version}, removed when the app stops\n"
                f"roles: migrations as {MIGRATOR}, the app as {APP} (rows only)"
            )
        finally:
            del os.environ["DATABASE_URL"], os.environ["MIGRATION_DATABASE_URL"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    try:
        with database() as where:
            print(f"database: {where}", flush=True)
            if prestart.main([]) != 0:
                return 1
            uvicorn.run("dblayer.api:create_app", factory=True, host=args.host, port=args.port)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
