"""PgBouncer for the tests: the `pgbouncer` fixture (tests/conftest.py) and the pages'
`needs="pgbouncer"` blocks. Where it is not installed, whatever needs it is skipped with one line
(REQUIRE_PGBOUNCER_TEST, which `.ci/run` sets, makes that a failure)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from sqlalchemy import URL

from dblayer.pgbouncer import NOT_INSTALLED, PgBouncer, PgBouncerError, find_pgbouncer, for_server


def require_pgbouncer() -> None:
    """Skip (or with REQUIRE_PGBOUNCER_TEST fail) in one line where PgBouncer is not installed."""
    try:
        find_pgbouncer()
    except PgBouncerError:
        if os.environ.get("REQUIRE_PGBOUNCER_TEST"):
            pytest.fail(NOT_INSTALLED, pytrace=False)
        pytest.skip(NOT_INSTALLED)


@contextlib.contextmanager
def serve_pgbouncer(admin_url: URL) -> Iterator[PgBouncer]:
    """PgBouncer (transaction mode) in front of the server of `admin_url`, stopped on exit."""
    require_pgbouncer()
    with for_server(admin_url) as bouncer:
        yield bouncer
