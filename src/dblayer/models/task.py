"""Tasks belong to a user; deleting the user deletes them (in the database: ON DELETE CASCADE)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Enum, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dblayer.models.base import Base
from dblayer.models.mixins import TimestampMixin, UUIDPrimaryKeyMixin

if TYPE_CHECKING:
    from dblayer.models.user import User


class TaskStatus(enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


# --8<-- [start:task]
class Task(UUIDPrimaryKeyMixin, TimestampMixin, Base):
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[TaskStatus] = mapped_column(
        Enum(TaskStatus, name="task_status"),
        default=TaskStatus.PENDING,
        server_default=TaskStatus.PENDING.name,
        index=True,
    )
    completed_at: Mapped[datetime | None] = mapped_column(index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )

    user: Mapped[User] = relationship(back_populates="tasks")

    __repr_attrs__ = ("title", "status")
    # --8<-- [end:task]
