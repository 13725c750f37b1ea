"""The ORM models. Importing this package registers every table on `Base.metadata`."""

from dblayer.models.base import NAMING_CONVENTION, Base
from dblayer.models.job import Job, JobStatus
from dblayer.models.mixins import SoftDeleteMixin, TimestampMixin, UUIDPrimaryKeyMixin
from dblayer.models.task import Task, TaskStatus
from dblayer.models.user import User, UserRole

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "Job",
    "JobStatus",
    "SoftDeleteMixin",
    "Task",
    "TaskStatus",
    "TimestampMixin",
    "UUIDPrimaryKeyMixin",
    "User",
    "UserRole",
]
