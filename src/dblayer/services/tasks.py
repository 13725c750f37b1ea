"""Creating tasks and moving them through their states."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from dblayer.models import Task, TaskStatus
from dblayer.repositories import TaskRepository, UserRepository
from dblayer.services.errors import InvalidStateError, NotFoundError


class TaskService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.tasks = TaskRepository(session)
        self.users = UserRepository(session)

    async def create(
        self, *, user_id: uuid.UUID, title: str, description: str | None = None
    ) -> Task:
        """A new pending task; `NotFoundError` when the user does not exist (or was deleted)."""
        if not await self.users.exists(user_id):
            raise NotFoundError(f"user {user_id} not found")
        return await self.tasks.create(user_id=user_id, title=title, description=description)

    async def get(self, task_id: uuid.UUID) -> Task:
        task = await self.tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"task {task_id} not found")
        return task

    async def _locked(self, task_id: uuid.UUID) -> Task:
        """The task, locked for this transaction: a concurrent change to it waits for our commit,
        and we see the change that committed before we read (read, check, write is then safe)."""
        task = await self.tasks.get_for_update(task_id)
        if task is None:
            raise NotFoundError(f"task {task_id} not found")
        return task

    async def mark_completed(self, task_id: uuid.UUID) -> Task:
        """Complete a task once: `completed_at` records when. A cancelled task cannot complete;
        completing a completed task changes nothing (a retried request is harmless)."""
        task = await self._locked(task_id)
        if task.status is TaskStatus.CANCELLED:
            raise InvalidStateError("a cancelled task cannot be completed")
        if task.status is TaskStatus.COMPLETED:
            return task
        return await self.tasks.update(
            task, status=TaskStatus.COMPLETED, completed_at=datetime.now(UTC)
        )

    async def cancel(self, task_id: uuid.UUID) -> Task:
        """Cancel a task that is not completed yet."""
        task = await self._locked(task_id)
        if task.status is TaskStatus.COMPLETED:
            raise InvalidStateError("a completed task cannot be cancelled")
        return await self.tasks.update(task, status=TaskStatus.CANCELLED)
