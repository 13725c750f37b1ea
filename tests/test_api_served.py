"""`python -m dblayer.api` (`make app`): pre-start, then the app served by uvicorn over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import Depends
from sqlalchemy import URL, make_url

from dblayer.api import __main__ as serve
from dblayer.api import create_app
from dblayer.embedded import find_binaries, free_port
from dblayer.migrate import head_revision
from dblayer.settings import get_settings
from dblayer.testing import connect
from tests.databases import Databases


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
    """Once the app answers on `port`, run `check` against it, then SIGTERM ourselves.
    Setting the thread's `stop_waiting` (when the app has exited by itself) ends the wait."""
    base = f"http://127.0.0.1:{port}"
    failures: list[BaseException] = []
    stop_waiting = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + 60
        while not stop_waiting.is_set() and time.monotonic() < deadline:
            try:
                if call(base, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                stop_waiting.wait(0.1)
        if stop_waiting.is_set():
            return  # nothing is served: nothing to check, nothing to stop
        try:
            check(base)
        except BaseException as error:  # reported by the test after the server stopped
            failures.append(error)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run)
    thread.failures = failures  # type: ignore[attr-defined]
    thread.stop_waiting = stop_waiting  # type: ignore[attr-defined]
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
        url = databases.url(name, "psycopg")
        monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
        port = free_port()
        checker = serve_until(port, real_http_checks)
        assert serve.main(["--port", str(port)]) == 0
        checker.join()
        assert not checker.failures, checker.failures  # type: ignore[attr-defined]
        out = capsys.readouterr().out
        # `str(url)` masks the password; a server with trust authentication may have none.
        assert out.startswith(f"database: configured: {url}\n")
        assert (
            url.password is None
            or "database: configured: postgresql+psycopg://postgres:***@" in out
        )
        assert "seed: created (3 tasks)" in out
    finally:
        databases.drop(name)


def test_the_app_starts_an_embedded_database_when_none_is_configured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    checker = serve_until(port, served_as_the_app_role)
    assert serve.main(["--port", str(port)]) == 0
    checker.join()
    assert not checker.failures, checker.failures  # type: ignore[attr-defined]
    assert "DATABASE_URL" not in os.environ
    assert "MIGRATION_DATABASE_URL" not in os.environ
    out = capsys.readouterr().out
    assert out.startswith(f"database: embedded PostgreSQL {find_binaries().version},")
    assert "roles: migrations as dblayer_migrator, the app as dblayer_app (rows only)\n" in out
    assert f"migrations: upgraded from base to head ({head_revision()})" in out


def served_as_the_app_role(base: str) -> None:
    """The app answers, logged in as the app role, which may not drop a table (the migrator
    owns them: pre-start migrated as it)."""
    status, page = call(base, "GET", "/tasks?limit=100")
    assert (status, len(page["items"])) == (200, 3)
    url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql")
    with connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("dblayer_app",)
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'tasks'")
        assert owner.fetchone() == ("dblayer_migrator",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner of table"):
            conn.execute("DROP TABLE tasks")
    migrator = make_url(os.environ["MIGRATION_DATABASE_URL"])
    assert migrator.username == "dblayer_migrator"


def test_bad_settings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://app:hunter2@h/db")
    assert serve.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: DATABASE_URL: unsupported 'mysql'")
    assert err.count("\n") == 1
    assert "hunter2" not in err


def test_the_app_is_not_served_when_prestart_fails(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that is not there fails pre-start on every server (a wrong password does not,
    where authentication is `trust`). Should the app be served anyway, the guard stops it and the
    test fails instead of waiting for a SIGTERM that never comes."""
    missing = database_url.set(database=f"{database_url.database}_missing")
    monkeypatch.setenv("DATABASE_URL", missing.render_as_string(hide_password=False))
    port = free_port()
    guard = serve_until(port, served_anyway)
    try:
        assert serve.main(["--port", str(port)]) == 1
    finally:
        guard.stop_waiting.set()  # type: ignore[attr-defined]
        guard.join()
    out, err = capsys.readouterr()
    assert f"database '{missing.database}' does not exist" in err
    assert "Uvicorn running" not in out + err
    assert not guard.failures, guard.failures  # type: ignore[attr-defined]


def served_anyway(base: str) -> None:
    raise AssertionError(f"the app was served at {base} although pre-start failed")


def read_config() -> str:
    """A dependency that fails for a reason that has nothing to do with the database."""
    return Path("/nonexistent/config.toml").read_text()


async def test_a_plain_oserror_is_a_500_logged_with_its_traceback(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """Not every OSError is the database: a file a route or a dependency cannot read is a bug (or
    another outage), answered 500 and logged by the server with its traceback, not a 503."""
    app = create_app(get_settings(database_url=database_url.render_as_string(hide_password=False)))

    @app.get("/report")
    def report() -> dict[str, str]:  # a plain def: FastAPI runs it in a thread
        return {"report": Path("/nonexistent/report.txt").read_text()}

    @app.get("/configured")
    async def configured(config: Annotated[str, Depends(read_config)]) -> dict[str, str]:
        return {"config": config}  # pragma: no cover - the dependency fails first

    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        while not (server.started or serving.done()):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{server.config.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/tasks")).status_code == 200  # the database is fine
            for path, file in [("/report", "report.txt"), ("/configured", "config.toml")]:
                caplog.clear()
                response = await client.get(path)
                assert (response.status_code, response.text) == (500, "Internal Server Error")
                assert "retry-after" not in response.headers
                assert "Exception in ASGI application" in caplog.text
                assert "Traceback (most recent call last)" in caplog.text
                assert (
                    f"FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/{file}'"
                    in caplog.text
                )
    finally:
        server.should_exit = True
        await serving
