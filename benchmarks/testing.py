"""What each way of isolating tests costs per test, in one run: pytest itself runs the tests.

A scratch project holds one module per strategy, TESTS trivial tests each; pytest runs each
module in turn (ROUNDS interleaved rounds), and a small plugin in the project's conftest records
each test's setup + teardown time: the fixture's cost, the test body aside. Strategies:
`dblayer.testing`'s `session` (savepoint, rolled back) and `database_url` (a template clone),
a database made per test by `Base.metadata.create_all` or by the migrations, and
pytest-postgresql's `postgresql` fixture (a database per test from its template) as the peer,
all on the same server with the same schema.

Run with `make bench`. Uses `DATABASE_URL` when set, else starts an embedded PostgreSQL. Writes
docs/.bench/testing.md (included by the testing page) and prints it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from sqlalchemy import URL

from benchmarks.recording import record
from dblayer.testing import connect

TESTS = 30  # per module and round
ROUNDS = 3  # the best (lowest) median of each strategy over the rounds is kept

STRATEGIES = {
    "savepoint": ("`session`: savepoint, an engine per test (dblayer.testing)", "session"),
    "warm": ("`session`: savepoint, one engine for the run's loop (dblayer.testing)", "session"),
    "clone": ("`database_url`: a template clone (dblayer.testing)", "database_url"),
    "peer": (
        "pytest-postgresql `postgresql`: a database from its template, connected (peer)",
        "postgresql",
    ),
    "create_all": ("a database per test, `Base.metadata.create_all`", "created_all"),
    "migrations": ("a database per test, the migrations (`alembic upgrade head`)", "migrated"),
}

CONFTEST = """\
import json
import os
from pathlib import Path

import pytest
from pytest_postgresql import factories
from sqlalchemy import create_engine, make_url
from sqlalchemy.pool import NullPool

from dblayer.migrate import upgrade
from dblayer.models import Base

pytest_plugins = ["dblayer.testing"]

SERVER = make_url(os.environ["TEST_DATABASE_URL"])


def _migrate(host, port, user, dbname, password, **_):
    url = SERVER.set(drivername="postgresql+psycopg", database=dbname)
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        upgrade(conn)
    engine.dispose()


postgresql_server = factories.postgresql_noproc(
    host=SERVER.host, port=SERVER.port, user=SERVER.username, password=SERVER.password,
    dbname="bench_peer", load=[_migrate],
)
postgresql = factories.postgresql("postgresql_server")


def _database_by(build):
    from psycopg import sql
    import psycopg

    admin = psycopg.connect(
        host=SERVER.host, port=SERVER.port, user=SERVER.username, password=SERVER.password,
        dbname="postgres", autocommit=True,
    )
    name = "bench_" + os.urandom(4).hex()
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    engine = create_engine(SERVER.set(drivername="postgresql+psycopg", database=name),
                           poolclass=NullPool)
    with engine.connect() as conn:
        build(conn)
        conn.commit()
    engine.dispose()
    yield name
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


@pytest.fixture
def created_all():
    yield from _database_by(Base.metadata.create_all)


@pytest.fixture
def migrated():
    yield from _database_by(upgrade)


COSTS = {}


def pytest_runtest_logreport(report):
    if report.when in ("setup", "teardown"):
        COSTS[report.nodeid] = COSTS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    Path(os.environ["BENCH_OUT"]).write_text(json.dumps(COSTS))
"""

MODULE = """\
import pytest


@pytest.mark.parametrize("n", range({tests}))
async def test_isolated({fixture}, n):
    pass
"""


# pytest-asyncio's loop scopes for the "warm" strategy: one loop (and engine) for the run.
SESSION_LOOP = [
    "-o",
    "asyncio_default_fixture_loop_scope=session",
    "-o",
    "asyncio_default_test_loop_scope=session",
]


def _run(project: Path, name: str, url: URL) -> float:
    """The median setup + teardown seconds of the module's tests, in a fresh pytest process."""
    out = project / f"{name}.json"
    env = {
        **os.environ,
        "TEST_DATABASE_URL": url.render_as_string(hide_password=False),
        "BENCH_OUT": str(out),
    }
    subprocess.run(  # noqa: S603 - our own interpreter, our own arguments
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"test_{name}.py"),
            *(SESSION_LOOP if name == "warm" else []),
        ],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    costs = json.loads(out.read_text())
    # The first test of a module also pays for the template (built once per run): left out.
    return float(statistics.median(list(costs.values())[1:]))


async def measure(url: URL) -> str:
    best = dict.fromkeys(STRATEGIES, float("inf"))
    admin = url.set(drivername="postgresql+psycopg", database="postgres")
    with tempfile.TemporaryDirectory(prefix="dblayer-bench-") as scratch:
        project = Path(scratch)
        (project / "conftest.py").write_text(CONFTEST)
        (project / "pytest.ini").write_text(
            "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        )
        for name, (_, fixture) in STRATEGIES.items():
            module = MODULE.format(tests=TESTS, fixture=fixture)
            (project / f"test_{name}.py").write_text(module)
        for _ in range(ROUNDS):
            for name in STRATEGIES:
                best[name] = min(best[name], _run(project, name, admin))
    server = await _server_version(admin)
    return table(best, server)


def table(best: dict[str, float], server: str) -> str:
    peer = best["peer"]
    lines = [
        "| isolation, per test (setup + teardown) | time | / pytest-postgresql | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, (label, _) in STRATEGIES.items():
        ratio = best[name] / peer
        target, met = "n/a", "n/a"
        if name == "clone":  # the same isolation as the peer: a fresh database per test
            target, met = "≤ 1.0x", "yes" if ratio <= 1.0 else "**no**"
        lines.append(f"| {label} | {best[name] * 1e3:.1f} ms | {ratio:.2f}x | {target} | {met} |")
    lines += [
        "",
        f"The median of {TESTS - 1} tests per strategy, the best of {ROUNDS} interleaved rounds, "
        "each a fresh pytest process. "
        f"PostgreSQL {server} on 127.0.0.1; pytest {version('pytest')}, pytest-postgresql "
        f"{version('pytest-postgresql')}, SQLAlchemy {version('sqlalchemy')}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs ({platform.machine()}). "
        "Recorded by `make bench`.",
    ]
    return "\n".join(lines) + "\n"


async def _server_version(url: URL) -> str:
    with connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


if __name__ == "__main__":
    record(measure, "testing")
