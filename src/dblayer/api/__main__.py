"""`python -m dblayer.api` (`make app`): pre-start, then serve the reference app with uvicorn.

The database is the one the settings name (`DATABASE_URL`, `POSTGRES_*`, `.env`); when they name
none, an embedded PostgreSQL is started for the app's lifetime and removed when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

import uvicorn

from dblayer import prestart
from dblayer.embedded import EmbeddedPostgres, find_binaries
from dblayer.settings import SettingsError, get_settings


@contextlib.contextmanager
def database() -> Iterator[str]:
    """Yield where the database is; start an embedded one when nothing is configured."""
    settings = get_settings()
    if settings.database_url is not None or "postgres_host" in settings.model_fields_set:
        yield f"configured: {settings.url}"  # str(URL) masks the password
        return
    with EmbeddedPostgres(find_binaries()) as server:
        url = server.url("postgres", settings.database_driver)
        os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
        try:
            yield f"embedded PostgreSQL {server.binaries.version}, removed when the app stops"
        finally:
            del os.environ["DATABASE_URL"]


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
