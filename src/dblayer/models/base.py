"""The declarative base: stable constraint names, timezone-aware datetimes, safe reprs.

Every model inherits `Base`. Its `MetaData` carries a naming convention, so every index and
constraint gets a predictable name that migrations can refer to (and autogenerate can compare);
`type_annotation_map` makes a plain `datetime` annotation a `TIMESTAMP WITH TIME ZONE`.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import DateTime, MetaData, String, Uuid, inspect
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, declared_attr

# --8<-- [start:naming]
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# --8<-- [end:naming]


# --8<-- [start:base]
class Base(AsyncAttrs, DeclarativeBase):
    """Base class of every model. `AsyncAttrs` adds `await obj.awaitable_attrs.name`."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),  # always TIMESTAMP WITH TIME ZONE
        str: String(255),  # a bare `str` gets a limit; say String(n) or Text when it differs
        uuid.UUID: Uuid(),  # PostgreSQL's native uuid type
    }

    @declared_attr.directive
    def __tablename__(cls) -> str:
        """`User` -> `users`, `TaskComment` -> `task_comments`: plural, so never a reserved word."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower() + "s"

    def to_dict(self) -> dict[str, Any]:
        """Column values by attribute name, without columns marked `info={"secret": True}`."""
        mapper = inspect(type(self))
        return {
            attr.key: getattr(self, attr.key)
            for attr in mapper.column_attrs
            if not any(column.info.get("secret") for column in attr.columns)
        }

    __repr_attrs__: ClassVar[tuple[str, ...]] = ()  # shown by repr() after the primary key

    def __repr__(self) -> str:
        """`User(id=UUID('…'), email='…')`: the key and `__repr_attrs__`, never a secret column.

        Reads only what is loaded, so printing an object never triggers a lazy load (which would
        fail with MissingGreenlet in async code); an unloaded value shows as `…`.
        """
        state = inspect(self)
        keys = [state.mapper.get_property_by_column(c).key for c in state.mapper.primary_key]
        secret = {
            attr.key
            for attr in state.mapper.column_attrs
            if any(column.info.get("secret") for column in attr.columns)
        }
        shown = [
            f"{key}={state.dict[key]!r}" if key in state.dict else f"{key}=…"
            for key in [*keys, *self.__repr_attrs__]
            if key not in secret
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # --8<-- [end:base]
