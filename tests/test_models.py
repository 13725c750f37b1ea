"""The models on a real database: defaults, names, soft delete, constraints, the diagram."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    ColumnClause,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    event,
    exc,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    configure_mappers,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

from dblayer.models import Base, SoftDeleteMixin, Task, TaskStatus, User, UserRole, mixins
from dblayer.models.diagram import er_diagram
from dblayer.models.mixins import _involves_soft_delete


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        yield session


def user(name: str = "ada", **values: object) -> User:
    return User(email=f"{name}@example.com", username=name, hashed_password="secret-hash", **values)


def test_table_names_are_plural_snake_case() -> None:
    assert sorted(Base.metadata.tables) == ["jobs", "tasks", "users"]

    class TaskComment(Base):
        __tablename__: str
        __table_args__ = {"info": {"scratch": True}}  # noqa: RUF012
        id = Column(Integer, primary_key=True)

    assert TaskComment.__tablename__ == "task_comments"
    Base.metadata.remove(TaskComment.__table__)  # type: ignore[arg-type]


def test_constraint_names_follow_the_convention() -> None:
    names = {
        table.name: sorted(
            [str(c.name) for c in table.constraints] + [str(i.name) for i in table.indexes]
        )
        for table in Base.metadata.sorted_tables
    }
    assert names == {
        "jobs": ["ix_jobs_queued", "pk_jobs"],
        "users": ["pk_users", "uq_users_email_live", "uq_users_username_live"],
        "tasks": [
            "fk_tasks_user_id_users",
            "ix_tasks_completed_at",
            "ix_tasks_status",
            "ix_tasks_user_id",
            "pk_tasks",
        ],
    }


def test_repr_and_to_dict_never_show_the_password() -> None:
    ada = user()
    assert repr(ada) == "User(id=…, email='ada@example.com', username='ada')"
    assert "hashed_password" not in ada.to_dict()
    assert ada.to_dict()["email"] == "ada@example.com"
    ada.id = uuid.UUID(int=1)
    assert repr(ada).startswith("User(id=UUID('00000000-0000-0000-0000-000000000001')")


async def test_defaults_from_python_and_from_the_server(session: AsyncSession) -> None:
    ada = user()
    session.add(ada)
    await session.commit()
    assert ada.id.version == 7
    assert (ada.role, ada.is_active, ada.is_superuser, ada.is_deleted) == (
        UserRole.USER,
        True,
        False,
        False,
    )
    assert ada.created_at.tzinfo is not None
    assert ada.created_at == ada.updated_at  # one transaction, one now()
    server_row = (await session.execute(text("SELECT role::text FROM users"))).scalar_one()
    assert server_row == "USER"  # the enum stores names


async def test_updated_at_is_fetched_with_the_update(session: AsyncSession) -> None:
    ada = user()
    session.add(ada)
    await session.commit()
    await asyncio.sleep(0.01)
    ada.full_name = "Ada Lovelace"
    await session.commit()
    assert "updated_at" in ada.__dict__  # loaded by RETURNING, not expired
    assert ada.updated_at > ada.created_at


async def test_uuid7_keys_follow_creation_order(session: AsyncSession) -> None:
    users = [user(f"u{i}") for i in range(20)]
    for item in users:
        session.add(item)
        await session.flush()
    stored = (await session.scalars(select(User).order_by(User.id))).all()
    assert [u.username for u in stored] == [u.username for u in users]


async def test_soft_delete_hides_rows_and_relationships(session: AsyncSession) -> None:
    ada = user(tasks=[Task(title="one")])
    grace = user("grace")
    session.add_all([ada, grace])
    await session.commit()
    grace.soft_delete()
    await session.commit()
    assert grace.deleted_at is not None
    assert [u.username for u in (await session.scalars(select(User))).all()] == ["ada"]
    everyone = select(User).execution_options(include_deleted=True)
    assert len((await session.scalars(everyone)).all()) == 2
    # A task's user is hidden too when soft-deleted: relationship loads get the same filter.
    ada.soft_delete()
    await session.commit()
    session.expunge_all()
    task = await session.scalar(select(Task).options(selectinload(Task.user)))
    assert task is not None
    assert task.user is None
    restored = await session.scalar(
        select(User).where(User.username == "grace").execution_options(include_deleted=True)
    )
    assert restored is not None
    restored.restore()
    await session.commit()
    assert (restored.is_deleted, restored.deleted_at) == (False, None)
    assert await session.scalar(select(func.count()).select_from(User)) == 1


def executed_statements(session: AsyncSession) -> list[object]:
    """The statements the session runs, as they are after the soft-delete hook (a listener on the
    instance runs after the class-level one)."""
    seen: list[object] = []
    event.listen(session.sync_session, "do_orm_execute", lambda state: seen.append(state.statement))
    return seen


async def test_the_soft_delete_hook_leaves_other_selects_untouched(session: AsyncSession) -> None:
    """A SELECT that touches no soft-delete model runs as it was built: a prebuilt statement keeps
    its memoized cache key instead of being copied (and its key rebuilt) on every execution."""
    ada = user(tasks=[Task(title="one")])
    session.add(ada)
    await session.commit()
    seen = executed_statements(session)
    by_id = select(Task).where(Task.id == bindparam("id"))
    for _ in range(2):
        assert await session.scalar(by_id, {"id": ada.tasks[0].id}) is not None
    assert seen == [by_id, by_id]
    listing = select(Task.title).order_by(Task.title)
    assert (await session.scalars(listing)).all() == ["one"]
    assert seen[-1] is listing


async def test_a_soft_delete_select_is_rewritten_once(session: AsyncSession) -> None:
    """The same statement object run twice gets the same rewritten statement, so its cache key
    is built once (the repository's prebuilt `get`)."""
    session.add(user())
    await session.commit()
    seen = executed_statements(session)
    by_name = select(User).where(User.username == bindparam("name"))
    for _ in range(2):
        assert await session.scalar(by_name, {"name": "ada"}) is not None
    assert seen[0] is not by_name
    assert seen[0] is seen[1]


async def test_soft_deleted_users_stay_hidden_behind_tasks(session: AsyncSession) -> None:
    """Through every path from a task to its user: joins, EXISTS, eager and lazy loads."""
    ada = user(tasks=[Task(title="ada's")])
    grace = user("grace", tasks=[Task(title="grace's")])
    session.add_all([ada, grace])
    await session.commit()
    grace.soft_delete()
    await session.commit()
    session.expunge_all()

    joined = select(Task.title).join(Task.user).order_by(Task.title)
    assert (await session.scalars(joined)).all() == ["ada's"]
    explicit = select(Task.title).join(User, Task.user_id == User.id)
    assert (await session.scalars(explicit)).all() == ["ada's"]
    users_of = select(User.username).join(User.tasks).where(Task.title == "grace's")
    assert (await session.scalars(users_of)).all() == []
    # EXISTS through the relationship, which names only the table (no ORM entity) inside
    with_live_user = select(func.count()).select_from(Task).where(Task.user.has())
    assert await session.scalar(with_live_user) == 1
    titles = select(Task.title).where(Task.user.has(User.username == "grace"))
    assert (await session.scalars(titles)).all() == []
    with_tasks = select(User.username).where(User.tasks.any()).order_by(User.username)
    assert (await session.scalars(with_tasks)).all() == ["ada"]
    for load in (selectinload(Task.user), joinedload(Task.user)):
        session.expunge_all()
        tasks = (await session.scalars(select(Task).options(load).order_by(Task.title))).all()
        assert [(t.title, t.user is not None) for t in tasks] == [
            ("ada's", True),
            ("grace's", False),
        ]
    session.expunge_all()
    task = await session.scalar(select(Task).where(Task.title == "grace's"))
    assert task is not None
    assert await task.awaitable_attrs.user is None  # the lazy load is filtered too
    included = select(Task.title).join(Task.user).execution_options(include_deleted=True)
    assert len((await session.scalars(included)).all()) == 2


async def test_a_statement_built_per_call_is_looked_into_once_per_shape(
    session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries built anew on every call (most of them) cost a cache-key lookup, not a walk over
    the statement; a statement SQLAlchemy cannot cache is walked every time, and still filtered."""
    ada, grace = user(), user("grace")
    session.add_all([ada, grace])
    await session.commit()
    grace.soft_delete()
    await session.commit()
    walks: list[object] = []
    monkeypatch.setattr(mixins, "_involves_soft_delete", spy(walks, mixins._involves_soft_delete))
    monkeypatch.setattr(mixins, "_INVOLVES", {})
    for name in ["ada", "grace", "ada"]:
        await session.scalar(select(Task.title).where(Task.title == name))
        await session.scalar(select(User.username).where(User.username == name))
    assert len(walks) == 2  # one per shape

    class Uncached(ColumnClause[bool]):
        inherit_cache = False  # SQLAlchemy compiles it every time, with no cache key

    found = select(User.username).where(Uncached("true", is_literal=True)).order_by(User.username)
    assert (await session.scalars(found)).all() == ["ada"]
    assert len(walks) == 3
    monkeypatch.setattr(mixins, "_INVOLVES_MAX", 1)  # full: forgotten, then relearned
    assert await session.scalar(select(User.email).where(User.username == "grace")) is None
    assert len(mixins._INVOLVES) == 1


def spy(calls: list[object], function: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def wrapper(statement: Any) -> bool:
        calls.append(statement)
        return function(statement)

    return wrapper


def test_a_model_that_eagerly_joins_a_soft_delete_model_is_filtered() -> None:
    """`lazy="joined"` adds the join at compile time, where the statement does not show it."""

    class Scratch(DeclarativeBase):
        pass

    class Owner(SoftDeleteMixin, Scratch):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Pet(Scratch):
        __tablename__ = "pets"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
        owner: Mapped[Owner] = relationship(lazy="joined")

    class Left(Scratch):  # two models that join each other eagerly, and no soft delete
        __tablename__ = "lefts"
        id: Mapped[int] = mapped_column(primary_key=True)
        right_id: Mapped[int] = mapped_column(ForeignKey("rights.id"))
        right: Mapped[Right] = relationship(lazy="joined", foreign_keys=[right_id])

    class Right(Scratch):
        __tablename__ = "rights"
        id: Mapped[int] = mapped_column(primary_key=True)
        left_id: Mapped[int] = mapped_column(ForeignKey("lefts.id"))
        left: Mapped[Left] = relationship(lazy="joined", foreign_keys=[left_id])

    configure_mappers()
    assert _involves_soft_delete(select(Pet))
    assert not _involves_soft_delete(select(Left))


async def test_unique_among_live_rows(session: AsyncSession) -> None:
    old = user()
    session.add(old)
    await session.commit()
    session.add(User(email=old.email, username="other", hashed_password="secret-hash"))
    with pytest.raises(exc.IntegrityError) as caught:
        await session.commit()
    assert caught.value.orig.sqlstate == "23505"  # type: ignore[union-attr]
    assert "uq_users_email_live" in str(caught.value)
    assert "secret-hash" not in str(caught.value)  # parameters are hidden from errors
    await session.rollback()
    old.soft_delete()
    await session.commit()
    session.add(user())
    await session.commit()  # the address is free while the old row is deleted


async def test_bad_input_is_refused_and_nothing_half_written(session: AsyncSession) -> None:
    session.add(user())
    await session.commit()
    for bad, sqlstate in [
        (user("x" * 60), "22001"),  # username longer than 50
        (Task(title="orphan", user_id=uuid.uuid4()), "23503"),
    ]:
        session.add_all([user("extra"), bad])
        with pytest.raises(exc.DBAPIError) as caught:
            await session.commit()
        assert caught.value.orig.sqlstate == sqlstate  # type: ignore[union-attr]
        await session.rollback()
    with pytest.raises(exc.DBAPIError) as caught:
        await session.execute(text("UPDATE users SET role = 'OWNER'"))
    assert caught.value.orig.sqlstate == "22P02"  # type: ignore[union-attr]
    await session.rollback()
    assert await session.scalar(select(func.count()).select_from(User)) == 1


async def test_deleting_a_user_deletes_their_tasks_in_the_database(session: AsyncSession) -> None:
    ada = user(tasks=[Task(title="one"), Task(title="two", status=TaskStatus.IN_PROGRESS)])
    session.add(ada)
    await session.commit()
    await session.execute(text("DELETE FROM users"))  # ON DELETE CASCADE, not the ORM
    await session.commit()
    assert await session.scalar(select(func.count()).select_from(Task)) == 0


def test_er_diagram_of_the_models() -> None:
    diagram = er_diagram()
    assert diagram.startswith("erDiagram\n    jobs {\n        bigint id PK\n")
    assert "\n    users {\n        uuid id PK\n" in diagram
    assert "        varchar(320) email UK\n" in diagram
    assert "        user_role role\n" in diagram
    assert '        timestamptz deleted_at "nullable"\n' in diagram
    assert diagram.endswith('    users ||--o{ tasks : "user_id"\n')


def test_er_diagram_marks_every_kind_of_key() -> None:
    metadata = MetaData()
    Table("owners", metadata, Column("id", Integer, primary_key=True))
    Table(
        "pets",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("tag", String(10), unique=True),
        Column("name", String(20)),
        Column("kind", Enum("cat", "dog", native_enum=False, name=None)),
        Column("owner_id", ForeignKey("owners.id"), nullable=True),
        UniqueConstraint("name"),
    )
    diagram = er_diagram(metadata)
    assert "        varchar(10) tag UK" in diagram
    assert "        varchar(20) name UK" in diagram
    assert '        varchar(3) kind "nullable"' in diagram
    assert '        integer owner_id FK "nullable"' in diagram
    assert diagram.endswith('    owners |o--o{ pets : "owner_id"\n')


LOOKUPS = {
    "uq_users_username_live": select(User).where(User.username == "ada"),
    "uq_users_email_live": select(User).where(func.lower(User.email) == "ada@example.org"),
}


@pytest.mark.parametrize("index", LOOKUPS)
async def test_the_soft_delete_filter_lets_the_partial_unique_indexes_be_used(
    session: AsyncSession, index: str
) -> None:
    """The indexes are partial (`WHERE NOT is_deleted`): PostgreSQL uses one only when the query
    says exactly that. `is_deleted IS false` does not imply it, and every login and registration
    scanned the table. Sequential scans are priced out, so the plan shows whether the index can
    be used at all, whatever the table's size."""
    await session.execute(text("SET LOCAL enable_seqscan = off"))
    filtered = LOOKUPS[index].options(mixins._HIDE_DELETED)  # what the hook makes of it
    dialect = (await session.connection()).dialect
    compiled = filtered.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    plan = "\n".join((await session.execute(text(f"EXPLAIN {compiled}"))).scalars().all())
    assert f"Index Scan using {index}" in plan, plan
