"""Queries about tasks."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import ColumnElement, select

from dblayer.models import Task, TaskStatus
from dblayer.repositories.base import Page, Repository


# --8<-- [start:tasks]
class TaskRepository(Repository[Task]):
    model = Task
    sortable = ("created_at", "updated_at", "title", "status")
    filterable = ("status", "user_id")

    # --8<-- [start:get_for_update]
    async def get_for_update(self, id: uuid.UUID) -> Task | None:
        """The task read with its row locked until the transaction ends, and reloaded even if
        the session holds it already (`populate_existing`): a rule checked on it cannot be
        overtaken by another request that changes the row in the meantime. `FOR NO KEY UPDATE`
        (`key_share`): the key does not change, so rows referencing it are not held up."""
        found: Task | None = await self.session.scalar(
            select(Task)
            .where(Task.id == id)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
        return found
        # --8<-- [end:get_for_update]

    async def get_by_user(
        self, user_id: uuid.UUID, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Task]:
        return await self.get_multi(filters={"user_id": user_id}, limit=limit, cursor=cursor)

    async def get_by_status(
        self, status: TaskStatus, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Task]:
        return await self.get_multi(filters={"status": status}, limit=limit, cursor=cursor)

    async def get_completed(self, *, limit: int = 50, cursor: str | None = None) -> Page[Task]:
        return await self.get_by_status(TaskStatus.COMPLETED, limit=limit, cursor=cursor)

    async def get_pending(self, *, limit: int = 50, cursor: str | None = None) -> Page[Task]:
        return await self.get_by_status(TaskStatus.PENDING, limit=limit, cursor=cursor)

    async def get_in_progress(self, *, limit: int = 50, cursor: str | None = None) -> Page[Task]:
        return await self.get_by_status(TaskStatus.IN_PROGRESS, limit=limit, cursor=cursor)

    async def get_user_tasks_by_status(
        self, user_id: uuid.UUID, status: TaskStatus, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Task]:
        return await self.get_multi(
            filters={"user_id": user_id, "status": status}, limit=limit, cursor=cursor
        )

    async def search_by_title(
        self,
        term: str,
        *,
        filters: Mapping[str, object] | None = None,
        sort: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Task]:
        """Tasks whose title contains `term`, case-insensitively. `%` and `_` in the term are
        matched literally (escaped), not as LIKE wildcards; the term is a bound parameter."""
        return await self.get_multi(
            filters=filters, sort=sort, limit=limit, cursor=cursor, where=[title_contains(term)]
        )
        # --8<-- [end:tasks]


def title_contains(term: str) -> ColumnElement[bool]:
    """`title ILIKE '%' || :term || '%' ESCAPE '/'`, with the term's wildcards escaped."""
    return Task.title.icontains(term, autoescape=True)
