"""A statement that runs too long is cancelled by the server (DB_STATEMENT_TIMEOUT), under both
drivers; the API answers 503 with Retry-After, and the pool serves the next request."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError

from dblayer.api import create_app
from dblayer.api.deps import SessionDep
from dblayer.engine import connect_args, create_engine
from dblayer.settings import SettingsError, get_settings
from tests.apps import client_for, settings_for


async def test_a_slow_statement_is_cancelled_and_the_pool_goes_on(database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    engine = create_engine(get_settings(database_url=url, db_statement_timeout=0.2))
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SHOW statement_timeout")) == "200ms"
            with pytest.raises(DBAPIError) as raised:
                await conn.execute(text("SELECT pg_sleep(2)"))
            assert getattr(raised.value.orig, "sqlstate", None) == "57014"  # query_canceled
        async with engine.connect() as conn:  # the same pool, the same server connection
            assert await conn.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


def test_without_the_setting_the_server_s_own_applies() -> None:
    for driver in ("asyncpg", "psycopg"):
        args = connect_args(get_settings(database_driver=driver))
        assert "server_settings" not in args
        assert "options" not in args


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_a_timeout_that_is_not_one_is_one_line(value: Any) -> None:
    with pytest.raises(SettingsError, match=r"^DB_STATEMENT_TIMEOUT: [^\n]+$"):
        get_settings(db_statement_timeout=value)


async def test_the_api_answers_503_with_retry_after_then_serves_the_next_request(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(database_url).model_copy(update={"db_statement_timeout": 0.2}))

    @app.get("/slow")
    async def slow(session: SessionDep) -> dict[str, int]:
        await session.execute(text("SELECT pg_sleep(2)"))
        return {"done": 1}  # pragma: no cover - cancelled before

    async for client in client_for(app):
        response = await client.get("/slow")
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert response.json() == {"detail": "the database is unavailable, try again shortly"}
        assert (await client.get("/tasks")).status_code == 200  # the pool serves the next one
    assert "503 for GET /slow: a statement ran past DB_STATEMENT_TIMEOUT" in caplog.text
