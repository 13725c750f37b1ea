"""Domain errors: what went wrong in the reader's terms. The API maps each to a status code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the errors a service raises on purpose; the message is safe to show."""


class NotFoundError(ServiceError):
    """The thing asked for does not exist (or was deleted)."""


class DuplicateError(ServiceError):
    """A value that must be unique is taken; `field` says which."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is already taken")
        self.field = field


class InvalidStateError(ServiceError):
    """The change is not allowed from the current state (e.g. completing a cancelled task)."""
