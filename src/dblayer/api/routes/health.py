"""Liveness and readiness: two questions for the orchestrator, answered differently."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from dblayer.api.schemas import ReadyRead
from dblayer.engine import DatabaseUnavailableError
from dblayer.migrate import current_revision, head_is_applied, head_revision

router = APIRouter(tags=["health"])


# --8<-- [start:health]
@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. No database call, so a database outage does not get every
    instance restarted (which would not fix the database)."""
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyRead,
    responses={503: {"model": ReadyRead, "description": "Not ready: send no traffic here."}},
)
async def ready(request: Request, response: Response) -> dict[str, str | None]:
    """Readiness: send traffic here only when the database answers and has this code's head
    applied. A database ahead of the code (a newer release migrated it) is ready too: otherwise
    a rolling deploy or a rollback would take every instance of the older release out."""
    try:
        current = await current_revision(request.app.state.engine)  # one connection, one query
    except (DatabaseUnavailableError, DBAPIError, PoolTimeoutError):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "database unavailable", "revision": None}
    if not head_is_applied(current):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {
            "status": f"migrations pending: at {current}, head is {head_revision()}",
            "revision": current,
        }
    return {"status": "ready", "revision": current}
    # --8<-- [end:health]
