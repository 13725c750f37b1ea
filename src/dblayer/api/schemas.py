"""What the API accepts and returns. Validation here answers 422 before any SQL runs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import BaseModel, ConfigDict, EmailStr, Field, SecretStr

from dblayer.models import TaskStatus, UserRole
from dblayer.repositories import TaskRepository

ItemT = TypeVar("ItemT")
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: a 422 here, not a driver error later


# --8<-- [start:schemas]
# The schema says what the validator refuses: email-validator rejects special-use domains
# (`x@y.test`), which `format: email` alone would allow.
SPECIAL_USE = "|".join(
    "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in name)  # any case, as it refuses
    for name in SPECIAL_USE_DOMAIN_NAMES
)
Email = Annotated[
    EmailStr,
    Field(
        max_length=254,
        json_schema_extra={"not": {"pattern": rf"[.@]({SPECIAL_USE})$"}},
        description=f"Not on a special-use domain ({', '.join(SPECIAL_USE_DOMAIN_NAMES)}).",
    ),
]
# The sort fields as a pattern: an unknown field is a 422 the schema predicts.
SORT = rf"^-?({'|'.join(TaskRepository.sortable)})$"
# A cursor is a token the server issued and signed (`<base64url>.<base64url signature>`): its
# shape is all a schema can say; a well-formed token the server did not sign, or one for another
# sort, is still a 422.
CURSOR = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"


class UserCreate(BaseModel):
    email: Email
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


class ReadyRead(BaseModel):
    status: str  # "ready", "database unavailable", "migrations pending: …"
    revision: str | None  # the database's migration revision
    # --8<-- [end:schemas]


# --8<-- [start:errors]
class ErrorRead(BaseModel):
    """The body of every error answer but 422: a short message, safe to show."""

    detail: str


class FieldErrorRead(BaseModel):
    loc: list[str | int]  # where: ["body", "email"], ["query", "limit"]
    msg: str
    type: str


class ValidationErrorRead(BaseModel):
    """422: one entry per problem (FastAPI's shape, minus the `input` it would echo back)."""

    detail: list[FieldErrorRead]


ERRORS: dict[int, tuple[type[BaseModel], str]] = {
    400: (ErrorRead, "The body could not be read as JSON."),
    404: (ErrorRead, "Not found."),
    409: (ErrorRead, "Conflicts with existing data, or with the resource's state."),
    422: (ValidationErrorRead, "The request is not valid; nothing was changed."),
    503: (ErrorRead, "The database is unavailable: retry after `Retry-After` seconds."),
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: the error statuses it answers, with their bodies."""
    return {
        code: {"model": ERRORS[code][0], "description": ERRORS[code][1]}
        | ({"headers": RETRY_AFTER} if code == 503 else {})
        for code in codes
    }
    # --8<-- [end:errors]
