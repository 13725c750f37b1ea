"""Repositories: the queries, one class per model. They never commit."""

from dblayer.repositories.base import InvalidQueryError, Page, Repository, Upserted
from dblayer.repositories.tasks import TaskRepository
from dblayer.repositories.users import UserRepository

__all__ = [
    "InvalidQueryError",
    "Page",
    "Repository",
    "TaskRepository",
    "Upserted",
    "UserRepository",
]
