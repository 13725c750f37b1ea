"""Services: business rules over repositories. They never commit; the caller's scope does."""

from dblayer.services.errors import (
    DuplicateError,
    InvalidStateError,
    NotFoundError,
    ServiceError,
)
from dblayer.services.tasks import TaskService
from dblayer.services.users import UserService

__all__ = [
    "DuplicateError",
    "InvalidStateError",
    "NotFoundError",
    "ServiceError",
    "TaskService",
    "UserService",
]
