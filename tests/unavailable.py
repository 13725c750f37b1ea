"""Connecting where the database cannot be reached: the one-line error, checked for secrets."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import URL

from dblayer.engine import DatabaseUnavailableError, check_connection, create_engine
from dblayer.settings import get_settings


async def unavailable(url: URL, caplog: pytest.LogCaptureFixture, **values: object) -> str:
    """Try to connect to `url` with echo on; return the one-line error, checked for secrets."""
    return str(await unavailable_error(url, caplog, None, **values))


async def unavailable_error(
    url: URL,
    caplog: pytest.LogCaptureFixture,
    unvalidated: dict[str, object] | None = None,
    **values: object,
) -> DatabaseUnavailableError:
    """`unavailable`, returning the error itself (for its `transient`). `unvalidated` values go
    past the settings' checks, as a server's own limits may be narrower than ours."""
    caplog.set_level(logging.DEBUG)
    password = url.password if isinstance(url.password, str) else None  # none on a trust server
    settings = get_settings(
        database_url=url.render_as_string(hide_password=False), db_echo=True, **values
    ).model_copy(update=unvalidated)
    engine = create_engine(settings)
    try:
        with pytest.raises(DatabaseUnavailableError) as caught:
            await check_connection(engine)
    finally:
        await engine.dispose()
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.__cause__ is None  # no driver traceback chained on
    for text in (message, caplog.text, repr(settings), repr(engine.sync_engine)):
        assert password is None or password not in text
    return caught.value
