"""`python -m dblayer.check`: can this process reach its database? One line either way.

Exit status 0 and `ok: PostgreSQL <version>` when it can; 1 and a one-line reason on stderr when the
settings are wrong or the server cannot be reached. The password never appears in either.
"""

from __future__ import annotations

import asyncio
import sys

from dblayer.engine import DatabaseUnavailableError, check_connection, create_engine
from dblayer.settings import SettingsError, get_settings


# --8<-- [start:check]
async def check() -> str:
    """Connect with the settings from the environment and return the server version."""
    engine = create_engine(get_settings())
    try:
        return await check_connection(engine)
    finally:
        await engine.dispose()
        # --8<-- [end:check]


def main() -> int:
    try:
        version = asyncio.run(check())
    except (SettingsError, DatabaseUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: PostgreSQL {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
