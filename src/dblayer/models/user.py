"""Users: unique email and username among live rows, a role, and a password hash kept secret."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from sqlalchemy import Enum, Index, String, false, func, text, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dblayer.models.base import Base
from dblayer.models.mixins import SoftDeleteMixin, TimestampMixin, UUIDPrimaryKeyMixin

if TYPE_CHECKING:
    from dblayer.models.task import Task


class UserRole(enum.Enum):
    USER = "user"
    ADMIN = "admin"
    SUPER_ADMIN = "super_admin"


# --8<-- [start:user]
class User(UUIDPrimaryKeyMixin, TimestampMixin, SoftDeleteMixin, Base):
    email: Mapped[str] = mapped_column(String(320))
    username: Mapped[str] = mapped_column(String(50))
    hashed_password: Mapped[str] = mapped_column(info={"secret": True})
    full_name: Mapped[str | None] = mapped_column(String(200))
    is_active: Mapped[bool] = mapped_column(default=True, server_default=true())
    is_superuser: Mapped[bool] = mapped_column(default=False, server_default=false())
    role: Mapped[UserRole] = mapped_column(
        Enum(UserRole, name="user_role"), default=UserRole.USER, server_default=UserRole.USER.name
    )

    tasks: Mapped[list[Task]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )

    __repr_attrs__ = ("email", "username")
    __table_args__ = (
        # Unique among live rows only: a soft-deleted user's email can be registered again.
        Index("uq_users_username_live", "username", unique=True, postgresql_where="NOT is_deleted"),
    )


# One address whatever its case (`Ada@x.org` is `ada@x.org`), enforced by the database for
# every path that writes, not only the service that lower-cases (revision 0003).
Index(
    "uq_users_email_live",
    func.lower(User.email),
    unique=True,
    postgresql_where=text("NOT is_deleted"),
)
# --8<-- [end:user]
