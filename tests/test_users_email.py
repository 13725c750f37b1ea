"""An email is one address whatever its case: the database enforces it, not only the service.

`UserService` lower-cases what it stores, but the repository's `create` and `bulk_create` (and
any SQL a reader writes) reach the table without it; the unique index on `lower(email)` is
what refuses `A@x.org` beside `a@x.org`, through every path, also when two requests race.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from dblayer.migrate import current_revision, downgrade_to, head_revision, upgrade_to_head
from dblayer.repositories import UserRepository
from dblayer.services import DuplicateError, UserService
from dblayer.session import session_scope


class CopyingUsers(UserRepository):
    copy_threshold: ClassVar[int] = 2  # COPY from two rows on


def _row(email: str, username: str) -> dict[str, Any]:
    return {"email": email, "username": username, "hashed_password": "x"}


async def _repository_create(session: AsyncSession, email: str, username: str) -> None:
    await UserRepository(session).create(**_row(email, username))


async def _service_create(session: AsyncSession, email: str, username: str) -> None:
    await UserService(session).create(email=email, username=username, password="correct horse")


async def _bulk_insert(session: AsyncSession, email: str, username: str) -> None:
    await UserRepository(session).bulk_create([_row(email, username)])


async def _bulk_copy(session: AsyncSession, email: str, username: str) -> None:
    await CopyingUsers(session).bulk_create(
        [_row(email, username), _row(f"x{email}", "x" + username)]
    )


async def _sql(session: AsyncSession, email: str, username: str) -> None:
    await session.execute(
        text(
            "INSERT INTO users (id, email, username, hashed_password)"
            " VALUES (gen_random_uuid(), :email, :username, 'x')"
        ),
        {"email": email, "username": username},
    )


Path = Callable[[AsyncSession, str, str], Awaitable[None]]
PATHS: dict[str, Path] = {
    "repository-create": _repository_create,
    "service-create": _service_create,
    "bulk-insert": _bulk_insert,
    "bulk-copy": _bulk_copy,
    "plain-sql": _sql,
}


@pytest.mark.parametrize("second", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("first", [_repository_create, _sql], ids=["stored-as-typed", "by-sql"])
async def test_an_email_differing_only_in_case_conflicts(
    sessionmaker: async_sessionmaker[AsyncSession], first: Path, second: Path
) -> None:
    async with session_scope(sessionmaker) as session:
        await first(session, "Ada@Example.org", "ada")
    with pytest.raises((IntegrityError, DuplicateError)) as refused:
        async with session_scope(sessionmaker) as session:
            await second(session, "ada@example.ORG", "other")
    if isinstance(refused.value, DuplicateError):
        assert refused.value.field == "email"
    else:
        assert isinstance(refused.value, IntegrityError)
        assert "uq_users_email_live" in str(refused.value.orig)
    async with session_scope(sessionmaker) as session:
        users = UserRepository(session)
        assert await users.count() == 1
        found = await users.get_by_email("ADA@example.org")
        assert found is not None
        assert found.username == "ada"


async def test_two_registrations_racing_with_different_case_one_wins(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async def register(email: str, username: str) -> str:
        async with session_scope(sessionmaker) as session:
            await _repository_create(session, email, username)
        return "created"

    for round_ in range(10):
        results = await asyncio.gather(
            register(f"Case{round_}@example.org", f"upper{round_}"),
            register(f"case{round_}@example.org", f"lower{round_}"),
            return_exceptions=True,
        )
        assert sorted(map(type, results), key=str) == sorted([str, IntegrityError], key=str), (
            results
        )


async def test_a_deleted_users_email_can_be_registered_again_in_any_case(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        users = UserRepository(session)
        ada = await users.create(**_row("Ada@example.org", "ada"))
        await users.delete(ada.id)
        await users.create(**_row("ada@example.org", "ada2"))
        assert await users.count() == 1


async def test_the_migration_refuses_existing_case_duplicates_then_succeeds_when_resolved(
    engine: AsyncEngine,
) -> None:
    """A failed and retried migration: live rows that differ only in case would make the new
    index fail half-way with a bare 'could not create unique index'; the revision says what to
    do instead, changes nothing, and succeeds once the rows are resolved."""
    await downgrade_to(engine, "0002")
    async with engine.begin() as conn:
        for email, username in [("Ada@example.org", "ada"), ("ada@example.org", "ada2")]:
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, username, hashed_password)"
                    " VALUES (gen_random_uuid(), :email, :username, 'x')"
                ),
                {"email": email, "username": username},
            )
    with pytest.raises(CommandError) as refused:
        await upgrade_to_head(engine)
    assert str(refused.value) == (
        "emails shared by live users whose addresses differ only in case; merge or soft-delete "
        "them, then upgrade again. Find them with: SELECT lower(email), count(*) FROM users "
        "WHERE NOT is_deleted GROUP BY 1 HAVING count(*) > 1"
    )
    assert "Ada@" not in str(refused.value)  # no personal data in a deploy log
    assert await current_revision(engine) == "0002"
    assert await _email_indexes(engine) == [EXACT], "the old index is gone or a new one stayed"
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE users SET is_deleted = true WHERE username = 'ada2'"))
    await upgrade_to_head(engine)
    assert await current_revision(engine) == head_revision()
    assert await _email_indexes(engine) == [LOWER]
    await downgrade_to(engine, "0002")  # and back: the case-sensitive index again
    assert await _email_indexes(engine) == [EXACT]


EXACT = (
    "CREATE UNIQUE INDEX uq_users_email_live ON public.users USING btree (email)"
    " WHERE (NOT is_deleted)"
)
LOWER = (
    "CREATE UNIQUE INDEX uq_users_email_live ON public.users USING btree"
    " (lower((email)::text)) WHERE (NOT is_deleted)"
)


async def _email_indexes(engine: AsyncEngine) -> list[str]:
    """Every index on users that mentions the email, valid or not."""
    async with engine.connect() as conn:
        rows = await conn.scalars(
            text(
                "SELECT pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN ''"
                " ELSE ' INVALID' END FROM pg_index i"
                " WHERE i.indrelid = 'users'::regclass"
                " AND pg_get_indexdef(i.indexrelid) LIKE '%email%' ORDER BY 1"
            )
        )
        return list(rows)


async def test_the_migration_finishes_what_an_interrupted_run_left(engine: AsyncEngine) -> None:
    """A run stopped after building its index (a deploy killed, a lock timeout on the drop), and
    a leftover of an interrupted downgrade: the next upgrade ends with exactly the one index."""
    await downgrade_to(engine, "0002")
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "CREATE UNIQUE INDEX uq_users_email_live_exact ON users (email)"
                " WHERE NOT is_deleted"
            )
        )
        await conn.execute(
            text(
                "CREATE UNIQUE INDEX uq_users_email_live_lower ON users (lower(email))"
                " WHERE NOT is_deleted"
            )
        )
        await conn.commit()
    await upgrade_to_head(engine)
    assert await _email_indexes(engine) == [LOWER]


async def test_a_lock_timeout_fails_the_swap_fast_and_a_retry_finishes_it(
    engine: AsyncEngine,
) -> None:
    """Like 0002: a concurrent build that waits behind a long transaction gives up after
    `lock_timeout` (here 200 ms, `-x lock_timeout=…`) instead of holding the deploy, leaves an
    INVALID index behind, and the next run drops it and finishes; the setting does not stay."""
    await downgrade_to(engine, "0002")
    async with engine.connect() as writer:  # an open transaction that writes to users
        await writer.execute(text("LOCK TABLE users IN ROW EXCLUSIVE MODE"))
        with pytest.raises(DBAPIError) as caught:
            await asyncio.wait_for(
                upgrade_to_head(engine, x_arguments=["lock_timeout=200ms"]), timeout=20
            )
        assert getattr(caught.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
        await writer.commit()
    assert await current_revision(engine) == "0002"
    assert await _email_indexes(engine) == [EXACT, f"{LOWER_BUILDING} INVALID"]
    async with engine.connect() as conn:
        assert await conn.scalar(text("SHOW lock_timeout")) == "0"
    await upgrade_to_head(engine, x_arguments=["lock_timeout=200ms"])
    assert await _email_indexes(engine) == [LOWER]


LOWER_BUILDING = LOWER.replace("uq_users_email_live ", "uq_users_email_live_lower ")
