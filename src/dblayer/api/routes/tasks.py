"""Tasks: create, list (search, filter, sort, keyset pages), read, complete, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from dblayer.api.deps import SessionDep
from dblayer.api.schemas import CURSOR, NO_NUL, SORT, PageRead, TaskCreate, TaskRead, errors
from dblayer.models import Task, TaskStatus
from dblayer.repositories import Page, TaskRepository
from dblayer.services import TaskService

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=errors(422, 503))


# --8<-- [start:tasks]
@router.get("", response_model=PageRead[TaskRead])
async def list_tasks(
    request: Request,
    session: SessionDep,
    search: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    status: TaskStatus | None = None,
    sort: Annotated[str | None, Query(pattern=SORT)] = None,  # e.g. "-created_at"
    limit: Annotated[int, Query(ge=1, le=TaskRepository.max_page_size)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, pattern=CURSOR)] = None,
) -> Page[Task]:
    """Unknown sort fields, a page over the cap and a tampered cursor are 422s; `search` is
    matched literally (its `%` and `_` too) as a bound parameter. Cursors are signed with the
    app's `DB_CURSOR_SECRET`, so every instance accepts the others'."""
    tasks = TaskRepository(session, cursor_secret=request.app.state.settings.db_cursor_secret)
    filters = {"status": status} if status else None
    if search:
        return await tasks.search_by_title(
            search, filters=filters, sort=sort, limit=limit, cursor=cursor
        )
    return await tasks.get_multi(filters=filters, sort=sort, limit=limit, cursor=cursor)


@router.post("", status_code=201, response_model=TaskRead, responses=errors(400, 404, 409))
async def create_task(body: TaskCreate, session: SessionDep) -> Task:
    return await TaskService(session).create(
        user_id=body.user_id, title=body.title, description=body.description
    )


@router.get("/{task_id}", response_model=TaskRead, responses=errors(404))
async def get_task(task_id: uuid.UUID, session: SessionDep) -> Task:
    return await TaskService(session).get(task_id)


@router.post("/{task_id}/complete", response_model=TaskRead, responses=errors(404, 409))
async def complete_task(task_id: uuid.UUID, session: SessionDep) -> Task:
    return await TaskService(session).mark_completed(task_id)


@router.post("/{task_id}/cancel", response_model=TaskRead, responses=errors(404, 409))
async def cancel_task(task_id: uuid.UUID, session: SessionDep) -> Task:
    return await TaskService(session).cancel(task_id)
    # --8<-- [end:tasks]
