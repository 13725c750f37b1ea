"""Jobs: work queued in a table, taken by workers with `FOR UPDATE SKIP LOCKED` (`dblayer.jobs`)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Enum, Identity, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from dblayer.models.base import Base
from dblayer.models.mixins import TimestampMixin


class JobStatus(enum.Enum):
    QUEUED = "queued"
    DONE = "done"
    FAILED = "failed"  # every attempt failed: left for a person to look at


# --8<-- [start:job]
class Job(TimestampMixin, Base):
    # A bigint from a sequence, not a UUID: the queue is first in, first out by id.
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    queue: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status"),
        default=JobStatus.QUEUED,
        server_default=JobStatus.QUEUED.name,
    )
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(default=3, server_default=text("3"))
    run_after: Mapped[datetime] = mapped_column(server_default=func.now())  # a retry's delay
    last_error: Mapped[str | None] = mapped_column(Text)

    __repr_attrs__ = ("queue", "status", "attempts")
    __table_args__ = (
        # What a worker looks for: the queued jobs of one queue, oldest first. Done and failed
        # jobs stay out of the index, so it stays small however long the history grows.
        Index("ix_jobs_queued", "queue", "id", postgresql_where="status = 'QUEUED'"),
    )
    # --8<-- [end:job]
