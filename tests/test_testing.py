"""The `dblayer.testing` plugin, run as a reader runs it: pytest on a scratch project whose
conftest enables it, against this run's server (in-process, so coverage sees the plugin)."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time

# The inner runs are in-process (so coverage sees the plugin), and pytester removes the modules
# a run imported when it ends: a C extension imported again in the next run can crash the
# interpreter. Imported here, they outlive every inner run.
import asyncpg  # noqa: F401
import psycopg
import pytest
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401

import dblayer.api.app  # noqa: F401
from dblayer.settings import Driver
from dblayer.testing import connect
from tests.blocks import READERS_PYTEST
from tests.databases import Server

pytest_plugins = ["pytester"]

CONFTEST = 'pytest_plugins = ["dblayer.testing"]\n'
INI = textwrap.dedent(
    """\
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    dblayer_database_prefix = {prefix}
    {extra}
    """
)


@pytest.fixture
def prefix() -> str:
    """The inner run's database prefix: its own, so a check for leftovers sees only its
    databases, not those of an inner run on another xdist worker."""
    return f"dblayer_testing_{secrets.token_hex(3)}_"


@pytest.fixture
def project(
    pytester: pytest.Pytester,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    subprocess_coverage: None,
) -> pytest.Pytester:
    """A reader's project: a conftest that enables the plugin, and this run's server."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI.format(extra="", prefix=prefix))
    monkeypatch.setenv("TEST_DATABASE_URL", server.admin_url.render_as_string(hide_password=False))
    monkeypatch.setenv("PYTEST_ADDOPTS", READERS_PYTEST)  # xdist workers start in a second less
    return pytester


@pytest.fixture
def driven(
    project: pytest.Pytester, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """The same project, its tests under one driver (the settings' DATABASE_DRIVER)."""
    monkeypatch.setenv("DATABASE_DRIVER", driver)
    return project


def leftover_databases(server: Server, prefix: str) -> list[str]:
    with connect(server.admin_url) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    return [str(name) for (name,) in rows]


def test_code_under_test_commits_and_rolls_back_and_nothing_outlives_the_test(
    driven: pytest.Pytester, server: Server, prefix: str
) -> None:
    driven.makepyfile(
        test_users=textwrap.dedent(
            """\
            import pytest
            from sqlalchemy import func, select, text
            from sqlalchemy.exc import IntegrityError

            from dblayer.models import User
            from dblayer.repositories import UserRepository


            async def test_commit_then_a_failed_insert(session):
                users = UserRepository(session)
                await users.create(email="ada@example.com", username="ada", hashed_password="x")
                await session.commit()  # the code under test commits: a savepoint ends
                with pytest.raises(IntegrityError):
                    await users.create(email="ada@example.com", username="ada", hashed_password="x")
                await session.rollback()  # back to the last savepoint, not the test's start
                assert await session.scalar(select(func.count()).select_from(User)) == 1


            async def test_the_next_test_and_another_connection_see_none_of_it(session, engine):
                assert await session.scalar(select(func.count()).select_from(User)) == 0
                async with engine.connect() as other:
                    assert await other.scalar(text("SELECT count(*) FROM users")) == 0
            """
        )
    )
    result = driven.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert leftover_databases(server, prefix) == []


def test_database_url_is_a_fresh_clone_dropped_after_the_test(
    driven: pytest.Pytester, server: Server, prefix: str
) -> None:
    driven.makepyfile(
        test_clone=textwrap.dedent(
            """\
            from sqlalchemy import text
            from sqlalchemy.ext.asyncio import create_async_engine

            SEEN = []


            async def test_writes_and_commits(database_url):
                engine = create_async_engine(database_url)
                async with engine.begin() as conn:
                    SEEN.append(await conn.scalar(text("SELECT current_database()")))
                    await conn.execute(text("CREATE TABLE mine (id int)"))
                await engine.dispose()


            async def test_gets_another_database_with_the_schema(database_url):
                engine = create_async_engine(database_url)
                async with engine.connect() as conn:
                    name = await conn.scalar(text("SELECT current_database()"))
                    assert name != SEEN[0]
                    assert await conn.scalar(text("SELECT to_regclass('mine')")) is None
                    assert await conn.scalar(text("SELECT to_regclass('users')")) == "users"
                await engine.dispose()
            """
        )
    )
    result = driven.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert leftover_databases(server, prefix) == []


def test_roles_named_after_a_test_s_database_are_dropped_with_the_run(
    driven: pytest.Pytester, server: Server, prefix: str
) -> None:
    """A project's test of its least-privilege roles (dblayer.roles): they outlive the
    database, so the run drops those named after its databases when it ends."""
    driven.makepyfile(
        test_roles=textwrap.dedent(
            """\
            from dblayer.roles import create_roles
            from dblayer.settings import get_settings


            async def test_the_roles(database_url):
                name = database_url.database
                lines = await create_roles(
                    get_settings(database_url=database_url.render_as_string(hide_password=False)),
                    migrator=f"{name}_migrator",
                    app=f"{name}_app",
                    migrator_password="m",
                    app_password="a",
                )
                assert lines[:2] == ["migrator: created", "app: created"]
            """
        )
    )
    result = driven.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert leftover_databases(server, prefix) == []
    with connect(server.admin_url) as conn:
        left = conn.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,)
        ).fetchall()
    assert left == []


def test_a_request_s_commit_is_seen_by_the_test_and_gone_in_the_next(
    driven: pytest.Pytester,
) -> None:
    driven.makepyfile(
        test_api=textwrap.dedent(
            """\
            from sqlalchemy import func, select

            from dblayer.models import User
            from dblayer.repositories import UserRepository

            NEW = {"email": "ada@example.com", "username": "ada", "password": "correct horse"}


            async def test_a_user_made_through_the_api(client, session):
                assert (await client.post("/users", json=NEW)).status_code == 201
                assert await session.scalar(select(func.count()).select_from(User)) == 1
                again = await client.post("/users", json=NEW)  # rolled back by the app
                assert again.status_code == 409
                assert await session.scalar(select(func.count()).select_from(User)) == 1


            async def test_is_gone_in_the_next_test(client):
                assert (await client.post("/users", json=NEW)).status_code == 201


            async def test_a_failed_request_keeps_the_test_s_own_rows(client, session):
                await UserRepository(session).create(
                    email="ada@example.com", username="ada", hashed_password="x"
                )  # flushed, not committed
                assert (await client.post("/users", json=NEW)).status_code == 409
                assert await session.scalar(select(func.count()).select_from(User)) == 1
            """
        )
    )
    result = driven.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_under_xdist_one_template_serves_every_worker(
    project: pytest.Pytester, server: Server, prefix: str
) -> None:
    project.makepyfile(
        test_many=textwrap.dedent(
            """\
            import pytest
            from sqlalchemy import text


            @pytest.mark.parametrize("n", range(6))
            async def test_one_template(session, n):
                found = await session.scalar(text(
                    "SELECT count(*) FROM pg_database WHERE datname LIKE '%\\\\_template'"
                    " AND starts_with(datname, '{prefix}')"
                ))
                assert found == 1
            """
        ).replace("{prefix}", prefix)
    )
    result = project.runpytest_inprocess("-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=6)
    assert leftover_databases(server, prefix) == []


def test_a_failing_setup_leaves_no_template_to_trust(
    project: pytest.Pytester, server: Server, prefix: str
) -> None:
    project.makeini(INI.format(extra="dblayer_setup = broken_setup:build", prefix=prefix))
    project.makepyfile(
        broken_setup=textwrap.dedent(
            """\
            from pathlib import Path


            def build(connection):
                with Path("attempts").open("a") as attempts:
                    attempts.write("tried\\n")
                raise RuntimeError("the migration failed")
            """
        ),
        test_any=textwrap.dedent(
            """\
            import pytest


            @pytest.mark.parametrize("n", range(3))
            async def test_needs_a_database(database_url, n):
                pass
            """
        ),
    )
    result = project.runpytest_inprocess()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*RuntimeError: the migration failed*"])
    assert leftover_databases(server, prefix) == []
    # Tried once: the later tests are told it failed, not made to run it again.
    assert (project.path / "attempts").read_text() == "tried\n"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ini", "*dblayer_setup = 'no_colon': expected module:function*"),
        ("driver", "*the settings: DATABASE_DRIVER: Input should be 'asyncpg' or 'psycopg'*"),
    ],
)
def test_a_wrong_setting_is_one_clear_line(
    project: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    message: str,
    prefix: str,
) -> None:
    if setting == "ini":
        project.makeini(INI.format(extra="dblayer_setup = no_colon", prefix=prefix))
    else:
        monkeypatch.setenv("DATABASE_DRIVER", "mysql")
    project.makepyfile(test_any="async def test_needs_a_database(database_url):\n    pass\n")
    result = project.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])


def test_without_test_database_url_an_embedded_server_is_started_and_stopped(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_DATABASE_URL")
    project.makepyfile(
        test_embedded=textwrap.dedent(
            """\
            from pathlib import Path


            def test_a_database(database_url):
                assert database_url.host == "127.0.0.1"
                Path("port").write_text(str(database_url.port))
            """
        )
    )
    result = project.runpytest_inprocess()
    result.assert_outcomes(passed=1)
    port = int((project.path / "port").read_text())
    with pytest.raises(psycopg.OperationalError):  # the server stopped with the run
        psycopg.connect(host="127.0.0.1", port=port, connect_timeout=3).close()


def test_a_run_without_database_tests_never_connects(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests stay fast and need no server: nothing is started or reached until a test asks
    (here, reaching the server would fail: nothing listens on its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TEST_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{port}/postgres")
    project.makepyfile(test_unit="def test_pure():\n    assert 1 + 1 == 2\n")
    result = project.runpytest_inprocess()
    result.assert_outcomes(passed=1)


def test_with_one_loop_for_the_run_one_engine_serves_every_test(
    driven: pytest.Pytester, prefix: str
) -> None:
    """The connection a test used is the next test's too (a warm pool), and the rollback
    isolates the tests all the same."""
    driven.makeini(
        INI.format(extra="asyncio_default_test_loop_scope = session", prefix=prefix).replace(
            "fixture_loop_scope = function", "fixture_loop_scope = session"
        )
    )
    driven.makepyfile(
        test_warm=textwrap.dedent(
            """\
            from sqlalchemy import func, select, text

            from dblayer.models import User
            from dblayer.repositories import UserRepository

            BACKENDS = []


            async def test_first(session):
                BACKENDS.append(await session.scalar(text("SELECT pg_backend_pid()")))
                await UserRepository(session).create(
                    email="ada@example.com", username="ada", hashed_password="x"
                )
                await session.commit()


            async def test_second(session):
                BACKENDS.append(await session.scalar(text("SELECT pg_backend_pid()")))
                assert BACKENDS[0] == BACKENDS[1]
                assert await session.scalar(select(func.count()).select_from(User)) == 0
            """
        )
    )
    result = driven.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("fixtures", "tests"), [("session", "function"), ("module", "function"), ("function", "module")]
)
def test_fixtures_and_tests_in_different_loops_are_refused(
    project: pytest.Pytester, prefix: str, fixtures: str, tests: str
) -> None:
    extra = f"asyncio_default_test_loop_scope = {tests}"
    ini = INI.format(extra=extra, prefix=prefix).replace("= function", f"= {fixtures}", 1)
    project.makeini(ini)
    project.makepyfile(test_any="async def test_needs_a_database(session):\n    pass\n")
    result = project.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*asyncio_default_fixture_loop_scope = {fixtures} with tests in a {tests} loop*"]
    )


def test_a_test_marked_for_another_loop_fails_with_the_reason(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_marked=textwrap.dedent(
            """\
            import pytest

            pytestmark = pytest.mark.asyncio(loop_scope="module")


            async def test_in_the_module_loop(session):
                pass
            """
        )
    )
    result = project.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*function with tests in a module loop*"])


def test_a_prefix_that_is_no_plain_name_is_refused(project: pytest.Pytester) -> None:
    project.makeini(INI.format(extra="", prefix="Our-Tests"))
    result = project.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*dblayer_database_prefix = 'Our-Tests': expected lower-case*"])


def test_a_whole_metadata_create_all_is_a_setup_too(driven: pytest.Pytester, prefix: str) -> None:
    """One line, no migrations: its DDL is committed, so the template has the tables."""
    driven.makeini(
        INI.format(extra="dblayer_setup = dblayer.models:Base.metadata.create_all", prefix=prefix)
    )
    driven.makepyfile(
        test_tables=textwrap.dedent(
            """\
            from sqlalchemy import text


            async def test_the_tables_are_there(session):
                assert await session.scalar(text("SELECT to_regclass('users')")) == "users"
                assert await session.scalar(text("SELECT to_regclass('alembic_version')")) is None
            """
        )
    )
    driven.runpytest_inprocess().assert_outcomes(passed=1)


OWN_APP = """\
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from dblayer.engine import create_engine
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import get_settings

sessionmaker = create_sessionmaker(create_engine(get_settings()))


async def get_db() -> AsyncIterator[AsyncSession]:
    async with session_scope(sessionmaker) as session:
        yield session


app = FastAPI()


@app.post("/notes")
async def add(db: AsyncSession = Depends(get_db)) -> dict[str, int]:
    await db.execute(text("CREATE TABLE IF NOT EXISTS notes (n int)"))
    await db.execute(text("INSERT INTO notes VALUES (1)"))
    return {"notes": await db.scalar(text("SELECT count(*) FROM notes"))}


@app.get("/broken")
async def broken() -> None:
    raise RuntimeError("the real cause")
"""


def test_your_own_app_and_its_own_session_dependency(project: pytest.Pytester) -> None:
    """Overriding `app` alone would let the app commit for real: refused with the fix. With
    `session_dependency` too, its writes are rolled back, and an error it does not handle is
    raised in the test with its message."""
    project.makepyfile(
        myapp=OWN_APP,
        test_mine=textwrap.dedent(
            """\
            import pytest

            import myapp


            @pytest.fixture
            def app():
                return myapp.app


            async def test_forgot_the_dependency(client):
                pass
            """
        ),
    )
    result = project.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no route of the app takes get_session*session_dependency*"])
    project.makepyfile(
        test_mine=textwrap.dedent(
            """\
            import pytest

            import myapp


            @pytest.fixture
            def app():
                return myapp.app


            @pytest.fixture
            def session_dependency():
                return myapp.get_db


            @pytest.mark.parametrize("n", range(2))
            async def test_each_test_starts_empty(client, n):
                assert (await client.post("/notes")).json() == {"notes": 1}


            async def test_an_unhandled_error_is_raised_here(client):
                with pytest.raises(RuntimeError, match="the real cause"):
                    await client.get("/broken")
            """
        ),
    )
    project.runpytest_inprocess().assert_outcomes(passed=3)


def test_a_bad_or_unreachable_server_is_one_line_without_the_password(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_any="def test_needs_a_database(database_url):\n    pass\n")
    monkeypatch.setenv("TEST_DATABASE_URL", "postgresql://ada:S3cretPw@db:no-port/app")
    result = project.runpytest_inprocess("--showlocals")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TEST_DATABASE_URL is not a database URL*"])
    assert "S3cretPw" not in result.stdout.str() + result.stderr.str()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TEST_DATABASE_URL", f"postgresql://ada:S3cretPw@127.0.0.1:{port}/app")
    result = project.runpytest_inprocess("--showlocals")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*RuntimeError: cannot connect to the test server*"])
    assert "S3cretPw" not in result.stdout.str() + result.stderr.str()


def test_under_xdist_a_run_without_database_tests_never_connects(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("TEST_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{port}/postgres")
    project.makepyfile(test_unit="def test_pure():\n    assert 1 + 1 == 2\n")
    result = project.runpytest_inprocess("-n", "1", "-p", "xdist")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_sigterm_ends_the_run_and_its_databases(
    project: pytest.Pytester, server: Server, prefix: str
) -> None:
    """A CI timeout or `kill` is handled like Ctrl-C: nothing is left on the server."""
    project.makepyfile(
        test_slow=textwrap.dedent(
            """\
            import time
            from pathlib import Path


            def test_waits(database_url):
                Path("started").write_text("yes")
                time.sleep(60)
            """
        )
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (project.path / "started").exists():
            assert run.poll() is None, "the run ended before its test started"
            assert time.monotonic() < deadline, "the run did not start its test"
            time.sleep(0.05)
        assert leftover_databases(server, prefix) != []  # the clone and the template
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert leftover_databases(server, prefix) == []


def test_a_project_with_its_own_models_and_schema(driven: pytest.Pytester, prefix: str) -> None:
    """A reader's own package: its models, its schema in the template (`dblayer_setup`), its
    tests on `session`; nothing of the guide's models or migrations is needed."""
    driven.makeini(
        INI.format(extra="dblayer_setup = shop.models:Base.metadata.create_all", prefix=prefix)
    )
    driven.mkpydir("shop")
    (driven.path / "shop" / "models.py").write_text(
        textwrap.dedent(
            """\
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


            class Base(DeclarativeBase):
                pass


            class Order(Base):
                __tablename__ = "orders"
                id: Mapped[int] = mapped_column(primary_key=True)
                total: Mapped[int]
            """
        )
    )
    driven.makepyfile(
        test_orders=textwrap.dedent(
            """\
            from sqlalchemy import func, select, text

            from shop.models import Order


            async def test_an_order(session):
                session.add(Order(total=12))
                await session.commit()
                assert await session.scalar(select(func.sum(Order.total))) == 12
                assert await session.scalar(text("SELECT to_regclass('users')")) is None


            async def test_no_order_left(session):
                assert await session.scalar(select(func.count()).select_from(Order)) == 0
            """
        )
    )
    driven.runpytest_inprocess("-p", "no:randomly").assert_outcomes(passed=2)
