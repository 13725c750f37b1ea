"""Pre-start and the served app: wait with retries, migrate, seed once; uvicorn over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer import prestart
from dblayer.api import __main__ as serve
from dblayer.embedded import EmbeddedPostgres, find_binaries
from dblayer.engine import DatabaseUnavailableError, create_engine
from dblayer.repositories import TaskRepository
from dblayer.services import UserService
from dblayer.session import session_scope
from dblayer.settings import Driver, get_settings
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
        assert first[1:] == ["migrations: at head (0002)", "seed: created (3 tasks)"]
        assert first[0].startswith("database: PostgreSQL 1")
        assert prestart.main([]) == 0  # idempotent
        second = capsys.readouterr().out.splitlines()
        assert second[2] == "seed: already there, nothing changed (3 tasks)"
    finally:
        databases.drop(name)


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
        assert (await prestart.wait_for_database(good)).startswith("16.")
        await good.dispose()
    finally:
        starter.join()
        await engine.dispose()
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - a local http:// URL we built
        base + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serve_until(port: int, check: Callable[[str], None]) -> threading.Thread:
    """Once the app answers on `port`, run `check` against it, then SIGTERM ourselves."""
    base = f"http://127.0.0.1:{port}"
    failures: list[BaseException] = []

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if call(base, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        try:
            check(base)
        except BaseException as error:  # reported by the test after the server stopped
            failures.append(error)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run)
    thread.failures = failures  # type: ignore[attr-defined]
    thread.start()
    return thread


def real_http_checks(base: str) -> None:
    """Bad input against the app served by uvicorn: 4xx, never a 500, nothing executed."""
    status, user = call(
        base,
        "POST",
        "/users",
        {"email": "a@example.com", "username": "ann", "password": "correct horse"},
    )
    assert status == 201
    assert (
        call(
            base,
            "POST",
            "/users",
            {"email": "A@example.com", "username": "ann2", "password": "correct horse"},
        )[0]
        == 409
    )
    for query in [
        "search=" + urllib.parse.quote("'; DROP TABLE tasks; --"),
        "status=" + urllib.parse.quote("pending' OR 1=1 --"),
        "sort=" + urllib.parse.quote("title; DELETE FROM users"),  # noqa: S608 - hostile input
        "limit=1000",
        "cursor=" + urllib.parse.quote("'); DROP TABLE users; --"),
    ]:
        status, body = call(base, "GET", f"/tasks?{query}")
        assert status in {200, 422}, (query, body)
    assert call(base, "GET", "/tasks/not-a-uuid")[0] == 422
    status, page = call(base, "GET", "/tasks?limit=100")
    assert (status, len(page["items"])) == (200, 3)  # the seeded tasks, all still there
    assert call(base, "GET", f"/users/{user['id']}")[0] == 200


def test_the_app_served_by_uvicorn_on_a_configured_database(
    monkeypatch: pytest.MonkeyPatch,
    databases: Databases,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = databases.clone(empty=True)
    try:
        monkeypatch.setenv(
            "DATABASE_URL", databases.url(name, "psycopg").render_as_string(hide_password=False)
        )
        port = free_port()
        checker = serve_until(port, real_http_checks)
        assert serve.main(["--port", str(port)]) == 0
        checker.join()
        assert not checker.failures, checker.failures  # type: ignore[attr-defined]
        out = capsys.readouterr().out
        assert out.startswith("database: configured: postgresql+psycopg://postgres:***@127.0.0.1:")
        assert "seed: created (3 tasks)" in out
    finally:
        databases.drop(name)


def test_the_app_starts_an_embedded_database_when_none_is_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    checker = serve_until(port, lambda base: None)
    assert serve.main(["--port", str(port)]) == 0
    checker.join()
    assert "DATABASE_URL" not in os.environ
    out = capsys.readouterr().out
    assert out.startswith("database: embedded PostgreSQL 16.")
    assert "migrations: at head (0002)" in out


def test_bad_settings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://app:hunter2@h/db")
    assert serve.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: DATABASE_URL: unsupported 'mysql'")
    assert err.count("\n") == 1
    assert "hunter2" not in err


async def test_seed_leaves_a_taken_demo_email_alone(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        await UserService(session).create(
            email="demo@example.com", username="someone", password="correct horse"
        )
        assert await prestart.seed(session) is False
        assert await TaskRepository(session).count() == 0


def test_the_app_is_not_served_when_prestart_fails(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = database_url.set(password="hunter2").render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", wrong)
    assert serve.main(["--port", str(free_port())]) == 1
    out, err = capsys.readouterr()
    assert "password authentication failed" in err
    assert "Uvicorn running" not in out + err
