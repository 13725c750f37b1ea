"""Exceptions to HTTP answers: a client's mistake is a 4xx, an unavailable database a 503.

Bodies carry a short, safe message: never SQL, bound values, a driver's text or a password.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc
from starlette.routing import compile_path

from dblayer.engine import DatabaseUnavailableError, describe_failure
from dblayer.repositories import InvalidQueryError
from dblayer.services import DuplicateError, InvalidStateError, NotFoundError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


# --8<-- [start:handlers]
def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(NotFoundError, _answer(status.HTTP_404_NOT_FOUND))
    app.add_exception_handler(DuplicateError, _answer(status.HTTP_409_CONFLICT))
    app.add_exception_handler(InvalidStateError, _answer(status.HTTP_409_CONFLICT))
    app.add_exception_handler(InvalidQueryError, _invalid_query)
    app.add_exception_handler(exc.TimeoutError, _unavailable)  # no pooled connection in time
    app.add_exception_handler(DatabaseUnavailableError, _unavailable)  # classified on connect
    app.add_exception_handler(exc.DBAPIError, _database_error)
    app.add_exception_handler(status.HTTP_405_METHOD_NOT_ALLOWED, _method_not_allowed)


Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def _answer(code: int) -> Handler:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=code)

    return handler


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's 422, minus the `input` it echoes back: that could be the password."""
    assert isinstance(error, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k not in {"input", "ctx"}} for e in error.errors()]
    return _unprocessable(jsonable_encoder(errors))


async def _invalid_query(request: Request, error: Exception) -> JSONResponse:
    """A list request the repository refused (a cursor it did not issue): a 422 like the others."""
    return _unprocessable([{"loc": ["query"], "msg": str(error), "type": "invalid_query"}])


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    """Every 422 has one shape (`ValidationErrorRead`): a list of what was wrong and where."""
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


# --8<-- [start:reasons]
# What the server cancelled or rolled back, though the request was fine: worth trying again
# (503 with Retry-After), logged with the reason.
_REASONS = {
    "57014": "a statement ran past DB_STATEMENT_TIMEOUT and the server cancelled it",
    "55P03": "a lock was not free in time (DB_LOCK_TIMEOUT, or NOWAIT) and the server cancelled",
    "25P03": "a transaction sat idle past DB_IDLE_IN_TRANSACTION_TIMEOUT; the server ended it",
    "40001": "a serialization failure (40001) rolled the transaction back",
    "40P01": "a deadlock (40P01) rolled the transaction back",
}
# --8<-- [end:reasons]


async def _unavailable(request: Request, error: Exception) -> JSONResponse:
    """503 with Retry-After: the request was fine, the database was not there for it."""
    if isinstance(error, exc.TimeoutError):
        reason = "no database connection free in time"
    elif isinstance(error, DatabaseUnavailableError):
        reason = str(error)
    elif (code := getattr(getattr(error, "orig", None), "sqlstate", None)) in _REASONS:
        reason = _REASONS[code]
    else:
        reason = describe_failure(request.app.state.engine.url, error)
    logger.warning("503 for %s %s: %s", request.method, request.url.path, reason)
    return JSONResponse(
        {"detail": "the database is unavailable, try again shortly"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _method_not_allowed(request: Request, error: Exception) -> JSONResponse:
    """405 with every method the schema documents for the path in `Allow` (Starlette lists only
    those of the first route that matched the path: `GET` where `/tasks` also takes `POST`)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.scope["path"]):
            methods |= {method.upper() for method in operations}
    methods |= {"HEAD"} if "GET" in methods else set()
    headers = {"Allow": ", ".join(sorted(methods))} if methods else getattr(error, "headers", None)
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=status.HTTP_405_METHOD_NOT_ALLOWED,
        headers=headers,
    )


async def _database_error(request: Request, error: Exception) -> JSONResponse:
    """Classify by SQLSTATE (the same for both drivers), not by the driver's exception class."""
    assert isinstance(error, exc.DBAPIError)
    sqlstate = str(getattr(error.orig, "sqlstate", "") or "")
    # Failing to connect is classified on connect (DatabaseUnavailableError); here, a connection
    # lost mid-request (SQLAlchemy noticed) or ended by the server (08, 57P: shutdown, terminate),
    # or what the server cancelled or rolled back though the request was fine (_REASONS: a
    # timeout, a lock timeout, a conflict with a concurrent transaction left after the retries).
    if error.connection_invalidated or sqlstate.startswith(("08", "57P")) or sqlstate in _REASONS:
        return await _unavailable(request, error)
    if sqlstate.startswith("23"):  # integrity: unique, foreign key, check, not null
        detail = "conflicts with existing data"
        return JSONResponse({"detail": detail}, status_code=status.HTTP_409_CONFLICT)
    if sqlstate.startswith("22") or isinstance(error, exc.DataError):  # too long, bad text…
        msg = "a value is not valid for the database"
        return _unprocessable([{"loc": [], "msg": msg, "type": "invalid_value"}])
    raise error  # a bug: let it be a 500, logged with its traceback
    # --8<-- [end:handlers]
