"""`set_not_null`: NOT NULL on a busy table, step by step, each step giving up on a held lock."""

from __future__ import annotations

import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from dblayer.migrations.helpers import set_not_null

NULLABLE = text(
    "SELECT is_nullable FROM information_schema.columns"
    " WHERE table_name = 'tasks' AND column_name = 'priority'"
)
CHECKS = text(
    "SELECT conname, convalidated FROM pg_constraint"
    " WHERE conrelid = 'tasks'::regclass AND contype = 'c'"
)


async def _tasks_with_priority(engine: AsyncEngine, *, null: bool) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE tasks ADD COLUMN priority integer"))
        await conn.execute(
            text(
                "INSERT INTO users (id, email, username, hashed_password)"
                " VALUES ('00000000-0000-0000-0000-000000000001', 'a@x.org', 'a', 'x')"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO tasks (id, title, user_id, priority) SELECT gen_random_uuid(), 't',"
                " '00000000-0000-0000-0000-000000000001', :p FROM generate_series(1, 3)"
            ),
            {"p": None if null else 1},
        )


def _set_not_null(connection: Connection, lock_timeout: str = "5s") -> None:
    set_not_null(
        MigrationContext.configure(connection), "tasks", "priority", lock_timeout=lock_timeout
    )


async def test_sets_not_null_and_leaves_no_check_nor_setting(engine: AsyncEngine) -> None:
    await _tasks_with_priority(engine, null=False)
    async with engine.connect() as conn:
        await conn.run_sync(_set_not_null)
        assert await conn.scalar(NULLABLE) == "NO"
        assert (await conn.execute(CHECKS)).all() == []
        assert await conn.scalar(text("SHOW lock_timeout")) == "0"
        await conn.commit()  # Alembic hands a revision its connection outside a transaction
        await conn.run_sync(_set_not_null)  # again: nothing changes, nothing fails
        assert await conn.scalar(NULLABLE) == "NO"


async def test_a_null_left_fails_validation_then_a_rerun_finishes(engine: AsyncEngine) -> None:
    await _tasks_with_priority(engine, null=True)
    async with engine.connect() as conn:
        with pytest.raises(exc.IntegrityError) as caught:
            await conn.run_sync(_set_not_null)
        assert getattr(caught.value.orig, "sqlstate", None) == "23514"
        assert (await conn.execute(CHECKS)).all() == [("ck_tasks_priority_not_null", False)]
        assert await conn.scalar(text("SHOW lock_timeout")) == "0"
        await conn.execute(text("UPDATE tasks SET priority = 0 WHERE priority IS NULL"))
        await conn.commit()
        await conn.run_sync(_set_not_null)
        assert await conn.scalar(NULLABLE) == "NO"
        assert (await conn.execute(CHECKS)).all() == []


async def test_a_held_lock_makes_it_give_up_fast(engine: AsyncEngine) -> None:
    await _tasks_with_priority(engine, null=False)
    async with engine.connect() as reader, engine.connect() as conn:
        await reader.execute(text("SELECT count(*) FROM tasks"))  # ACCESS SHARE, held
        with pytest.raises(exc.DBAPIError) as caught:
            await conn.run_sync(_set_not_null, "100ms")
        assert getattr(caught.value.orig, "sqlstate", None) == "55P03"
        assert await conn.scalar(text("SHOW lock_timeout")) == "0"
        await conn.commit()
        await reader.commit()
        await conn.run_sync(_set_not_null, "100ms")
        assert await conn.scalar(NULLABLE) == "NO"
