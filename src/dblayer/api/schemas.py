"""What the API accepts and returns. Validation here answers 422 before any SQL runs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, EmailStr, Field, SecretStr

from dblayer.models import TaskStatus, UserRole

ItemT = TypeVar("ItemT")
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: a 422 here, not a driver error later


# --8<-- [start:schemas]
class UserCreate(BaseModel):
    email: EmailStr
    username: Annotated[str, Field(min_length=3, max_length=50, pattern=r"^[A-Za-z0-9_.-]+$")]
    password: Annotated[SecretStr, Field(min_length=8, max_length=128)]  # never echoed back
    full_name: Annotated[str | None, Field(max_length=200, pattern=NO_NUL)] = None


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    username: str
    full_name: str | None
    is_active: bool
    role: UserRole
    created_at: datetime


class TaskCreate(BaseModel):
    user_id: uuid.UUID
    title: Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
    description: Annotated[str | None, Field(max_length=10_000, pattern=NO_NUL)] = None


class TaskRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    user_id: uuid.UUID
    title: str
    description: str | None
    status: TaskStatus
    completed_at: datetime | None
    created_at: datetime


class PageRead(BaseModel, Generic[ItemT]):
    items: list[ItemT]
    next_cursor: str | None  # pass as ?cursor= for the next page; null on the last
    # --8<-- [end:schemas]
