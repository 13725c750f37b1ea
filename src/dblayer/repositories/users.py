"""Queries about users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import selectinload

from dblayer.models import Task, User
from dblayer.repositories.base import Repository


class UserRepository(Repository[User]):
    model = User
    sortable = ("created_at", "username", "email")
    filterable = ("is_active", "role")
    # The unique index of revision 0003: one live user per email, whatever its case.
    upsert_index = (func.lower(User.email),)
    upsert_where = ~User.is_deleted

    async def get_by_username(self, username: str) -> User | None:
        found: User | None = await self.session.scalar(
            select(User).where(User.username == username)
        )
        return found

    async def get_by_email(self, email: str) -> User | None:
        """Compared as the unique index compares (PostgreSQL's `lower()` on both sides, so the
        index is used and Python's idea of lower case never disagrees with the database's)."""
        found: User | None = await self.session.scalar(
            select(User).where(func.lower(User.email) == func.lower(email))
        )
        return found

    async def replace_password_hash(self, user: User, *, old: str, new: str) -> bool:
        """Store `new` only where the hash is still `old`: a login's rehash must not undo a
        password change that committed since the login read the row. "fetch" updates the
        session's object only when the row really changed."""
        result = await self.session.execute(
            update(User)
            .where(User.id == user.id, User.hashed_password == old)
            .values(hashed_password=new)
            .execution_options(synchronize_session="fetch")
        )
        return bool(cast("CursorResult[Any]", result).rowcount)

    async def username_exists(self, username: str) -> bool:
        found = await self.session.scalar(select(User.id).where(User.username == username).limit(1))
        return found is not None

    async def get_user_with_tasks(self, id: uuid.UUID) -> User | None:
        """The user and all their tasks in two queries (no lazy load later, which async forbids)."""
        found: User | None = await self.session.scalar(
            select(User).where(User.id == id).options(selectinload(User.tasks))
        )
        return found

    async def get_users_with_task_counts(self) -> Sequence[tuple[User, int]]:
        """Every live user with how many tasks they have (zero included), in one query."""
        count = func.count(Task.id)
        statement = (
            select(User, count)
            .outerjoin(User.tasks)
            .group_by(User.id)
            .order_by(User.created_at, User.id)
        )
        rows = await self.session.execute(statement)
        return [(user, tasks) for user, tasks in rows]
