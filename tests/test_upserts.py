"""`Repository.upsert` on a real database: ORM objects back, inserted vs updated, the key of the
unique index of revision 0003, and concurrent upserts of one key on separate sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import exc, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import User
from dblayer.repositories import TaskRepository, Upserted, UserRepository
from dblayer.session import session_scope

ROUNDS = 25
AT_ONCE = 4  # sessions upserting the same key in each round


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_scope(sessionmaker) as session:
        yield session


def row(email: str, username: str, full_name: str | None = None) -> dict[str, object]:
    return {"email": email, "username": username, "hashed_password": "x", "full_name": full_name}


async def test_inserts_then_updates_and_says_which(session: AsyncSession) -> None:
    users = UserRepository(session)
    first = await users.upsert([row("ada@example.com", "ada", "Ada")], update=["full_name"])
    assert (first.inserted, first.updated, first.created) == (1, 0, [True])
    (ada,) = first.items
    assert isinstance(ada, User)
    assert ada.full_name == "Ada"
    assert ada.created_at is not None  # RETURNING brought the server defaults

    second = await users.upsert(
        [row("ADA@example.com", "ada", "Ada Lovelace"), row("bob@example.com", "bob", "Bob")],
        update=["full_name"],
    )
    assert (second.inserted, second.updated) == (1, 1)
    created = {user.username: new for user, new in zip(second.items, second.created, strict=True)}
    assert created == {"ada": False, "bob": True}
    assert ada in second.items  # the same identity, refreshed (populate_existing)
    assert ada.full_name == "Ada Lovelace"
    assert ada.email == "ada@example.com"  # the key as stored: `email` was not in `update`
    assert await session.scalar(select(func.count()).select_from(User)) == 2


async def test_updated_at_is_set_by_the_update(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """ON CONFLICT's SET does not run the column's Python-side `onupdate`; the upsert sets it."""
    async with session_scope(sessionmaker) as session:
        (ada,) = (await UserRepository(session).upsert([row("a@x.org", "a")], update=[])).items
    async with session_scope(sessionmaker) as session:
        updated = await UserRepository(session).upsert(
            [row("a@x.org", "a", "A")], update=["full_name"]
        )
    assert updated.items[0].updated_at > ada.updated_at


async def test_update_nothing_returns_the_existing_row_unchanged(session: AsyncSession) -> None:
    users = UserRepository(session)
    await users.upsert([row("ada@example.com", "ada", "Ada")], update=["full_name"])
    again = await users.upsert([row("Ada@Example.com", "ada2", "Someone else")], update=())
    assert (again.inserted, again.updated) == (0, 1)
    (ada,) = again.items
    assert (ada.email, ada.username, ada.full_name) == ("ada@example.com", "ada", "Ada")


async def test_a_soft_deleted_user_does_not_conflict(session: AsyncSession) -> None:
    """The index is partial (`NOT is_deleted`): the same email registers again as a new row."""
    users = UserRepository(session)
    (old,) = (await users.upsert([row("ada@example.com", "ada")], update=())).items
    await users.delete(old.id)
    new = await users.upsert([row("ada@example.com", "ada")], update=["full_name"])
    assert new.created == [True]
    assert new.items[0].id != old.id


async def test_nothing_to_upsert(session: AsyncSession) -> None:
    assert await UserRepository(session).upsert([], update=["full_name"]) == Upserted([], [])


async def test_a_model_without_an_upsert_index_refuses(session: AsyncSession) -> None:
    with pytest.raises(TypeError, match="TaskRepository has no upsert_index"):
        await TaskRepository(session).upsert([{"title": "t"}], update=["title"])


async def test_an_unknown_column_is_refused(session: AsyncSession) -> None:
    with pytest.raises(ValueError, match="User has no column 'tasks'"):
        await UserRepository(session).upsert([row("a@x.org", "a")], update=["tasks"])


async def test_the_same_key_twice_in_one_call_fails(session: AsyncSession) -> None:
    """PostgreSQL refuses to update one row twice in a statement (SQLSTATE 21000)."""
    with pytest.raises(exc.DBAPIError) as caught:  # the class differs by driver
        await UserRepository(session).upsert(
            [row("a@x.org", "a"), row("A@x.org", "b")], update=["full_name"]
        )
    assert caught.value.orig.sqlstate == "21000"  # type: ignore[union-attr]


async def test_another_unique_index_still_conflicts(session: AsyncSession) -> None:
    """ON CONFLICT covers its own index only: a taken username is an IntegrityError."""
    users = UserRepository(session)
    await users.upsert([row("a@x.org", "ada")], update=())
    with pytest.raises(exc.IntegrityError, match="uq_users_username_live"):
        await users.upsert([row("b@x.org", "ada")], update=["full_name"])


async def test_concurrent_upserts_of_one_key_never_fail_and_leave_one_row(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """Each round, AT_ONCE sessions upsert the same new email at once: no duplicate-key error
    in any of them, one of them inserted, the others updated, and one row stored."""

    async def upsert(round_: int, n: int) -> bool:
        async with session_scope(sessionmaker) as session:
            email = f"race{round_}@example.com" if n % 2 else f"RACE{round_}@example.com"
            done = await UserRepository(session).upsert(
                [row(email, f"race{round_}", f"writer {n}")], update=["full_name"]
            )
            return done.created[0]

    for round_ in range(ROUNDS):
        async with asyncio.timeout(30):
            created = await asyncio.gather(*(upsert(round_, n) for n in range(AT_ONCE)))
        assert sorted(created) == [False] * (AT_ONCE - 1) + [True], created
    async with sessionmaker() as session:
        stored = await session.execute(
            text("SELECT lower(email), count(*) FROM users GROUP BY 1 HAVING count(*) > 1")
        )
        assert stored.all() == []
        assert await session.scalar(select(func.count()).select_from(User)) == ROUNDS
