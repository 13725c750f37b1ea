"""The repository against its floors and a peer, in one run: get-by-id and a 50 000-row insert.

`Repository.get` is timed beside raw asyncpg, SQLAlchemy Core, a plain `AsyncSession.get` and
advanced-alchemy's repository `get` (the library option), all on the same rows and driver.

Run with `make bench`. Uses `DATABASE_URL` when set, else starts an embedded PostgreSQL; works in
a scratch database it creates and drops. Writes docs/.bench/repositories.md (included by the
repositories page) and prints it. Ratios, measured side by side, not timings to assert on.
"""

from __future__ import annotations

import os
import platform
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from importlib.metadata import version

import asyncpg
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import URL, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from benchmarks.recording import record
from dblayer.engine import create_engine
from dblayer.migrate import upgrade_to_head
from dblayer.models import Task
from dblayer.repositories import TaskRepository, UserRepository
from dblayer.session import create_sessionmaker, session_scope
from dblayer.settings import get_settings

LOOKUPS = 10_000  # in batches of BATCH, each measure's batch right after the others'
BATCH = 200
ROWS = 50_000
ROUNDS = 9  # bulk inserts: the best of nine, the least disturbed by whatever else runs
DRIVERS = ("asyncpg", "psycopg")
DATABASE = "dblayer_bench_repositories"


# A lookup measure: given some keys, seconds per lookup of each. Made once per measure (engine,
# pool and caches warm), then called in turn with every other measure, batch after batch.
Lookup = Callable[[list[uuid.UUID]], Awaitable[float]]


def _per_lookup(started: float, ids: list[uuid.UUID]) -> float:
    return (time.perf_counter() - started) / len(ids)


@asynccontextmanager
async def orm_lookups(url: URL, get: str) -> AsyncIterator[Lookup]:
    """`get`: "repository" (`TaskRepository.get`), "session" (a plain `AsyncSession.get`),
    "floor" (the repository's statement with every `do_orm_execute` listener skipped: what the
    ORM costs with no hook at all) or "peer" (advanced-alchemy's `repository.get`). Each batch in
    a new session, as a request would; emptied after each lookup, so every row is built anew."""
    engine = create_engine(get_settings(database_url=url.render_as_string(hide_password=False)))
    sessionmaker = create_sessionmaker(engine)

    async def run(ids: list[uuid.UUID]) -> float:
        async with sessionmaker() as session:
            lookup: Callable[[uuid.UUID], Awaitable[Task | None]]
            if get == "repository":
                lookup = TaskRepository(session).get
            elif get == "session":
                lookup = partial(session.get, Task)
            elif get == "floor":
                lookup = partial(_unhooked_get, session)
            else:
                lookup = AdvancedAlchemyTasks(session=session).get
            started = time.perf_counter()
            for id in ids:
                assert await lookup(id) is not None
                session.expunge_all()
            return _per_lookup(started, ids)

    try:
        yield run
    finally:
        await engine.dispose()


async def _unhooked_get(session: AsyncSession, id: uuid.UUID) -> Task | None:
    """`TaskRepository.get` without the soft-delete hook, or any other listener: SQLAlchemy's
    private `_sa_skip_events` option, a measuring instrument here, never a way to skip the hook."""
    skip = {"_sa_skip_events": True}
    found: Task | None = await session.scalar(
        TaskRepository._by_id, {"id": id}, execution_options=skip
    )
    return found


class AdvancedAlchemyTasks(SQLAlchemyAsyncRepository[Task]):
    """advanced-alchemy's generic repository for the same model: the peer row."""

    model_type = Task


@asynccontextmanager
async def core_lookups(url: URL) -> AsyncIterator[Lookup]:
    """A Core SELECT on one AsyncConnection: SQLAlchemy's floor, without the ORM."""
    engine = create_engine(get_settings(database_url=url.render_as_string(hide_password=False)))
    table = Task.__table__
    statement = select(table).where(table.c.id == bindparam("id"))

    async def run(ids: list[uuid.UUID]) -> float:
        async with engine.connect() as conn:
            started = time.perf_counter()
            for id in ids:
                assert (await conn.execute(statement, {"id": id})).first() is not None
            return _per_lookup(started, ids)

    try:
        yield run
    finally:
        await engine.dispose()


@asynccontextmanager
async def raw_lookups(url: URL) -> AsyncIterator[Lookup]:
    """A prepared asyncpg `fetchrow` of the same row, on one connection."""
    conn = await asyncpg.connect(_dsn(url))
    statement = await conn.prepare("SELECT * FROM tasks WHERE id = $1")

    async def run(ids: list[uuid.UUID]) -> float:
        started = time.perf_counter()
        for id in ids:
            assert await statement.fetchrow(id) is not None
        return _per_lookup(started, ids)

    try:
        yield run
    finally:
        await conn.close()


async def interleaved_lookups(lookups: dict[str, Lookup], ids: list[uuid.UUID]) -> dict[str, float]:
    """The best seconds per lookup of each measure, over short batches taken in turn: a busy
    moment of the machine falls on one batch of each, not on one measure's whole run."""
    for run in lookups.values():
        await run(ids[:BATCH])  # warm the pool and the statement caches
    best = dict.fromkeys(lookups, float("inf"))
    for start in range(0, len(ids), BATCH):
        for name, run in lookups.items():
            best[name] = min(best[name], await run(ids[start : start + BATCH]))
    return best


async def repository_bulk(url: URL, user_id: uuid.UUID) -> float:
    """Rows per second through `TaskRepository.bulk_create` (and its COPY), committed."""
    engine = create_engine(get_settings(database_url=url.render_as_string(hide_password=False)))
    sessionmaker = create_sessionmaker(engine)

    async def run() -> float:
        rows = [{"title": f"task {i}", "user_id": user_id} for i in range(ROWS)]
        started = time.perf_counter()
        async with session_scope(sessionmaker) as session:
            await TaskRepository(session).bulk_create(rows)
        elapsed = time.perf_counter() - started
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM tasks WHERE title LIKE 'task %'"))
        return elapsed

    try:
        return ROWS / await run()
    finally:
        await engine.dispose()


async def raw_bulk(url: URL, user_id: uuid.UUID) -> float:
    """Rows per second through asyncpg's `copy_records_to_table`, keys made the same way."""
    conn = await asyncpg.connect(_dsn(url))

    async def run() -> float:
        started = time.perf_counter()
        # The columns the repository writes: the key and status have defaults made in Python.
        records = [(uuid7(), f"task {i}", "PENDING", user_id) for i in range(ROWS)]
        async with conn.transaction():
            await conn.copy_records_to_table(
                "tasks", records=records, columns=["id", "title", "status", "user_id"]
            )
        elapsed = time.perf_counter() - started
        await conn.execute("DELETE FROM tasks WHERE title LIKE 'task %'")
        return elapsed

    try:
        return ROWS / await run()
    finally:
        await conn.close()


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def prepare(url: URL) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A scratch database at migration head, one user and 10 000 tasks to look up."""
    admin = await asyncpg.connect(_dsn(url))
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
    await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    await admin.close()
    engine = create_engine(get_settings(database_url=_dsn(url.set(database=DATABASE))))
    await upgrade_to_head(engine)
    async with session_scope(create_sessionmaker(engine)) as session:
        user = await UserRepository(session).create(
            email="bench@example.com",
            username="bench",
            hashed_password="unused",  # noqa: S106
        )
        keys = [uuid7() for _ in range(10_000)]
        rows = [
            {"id": key, "title": f"lookup {i}", "user_id": user.id} for i, key in enumerate(keys)
        ]
        await TaskRepository(session).bulk_create(rows)
    await engine.dispose()
    return user.id, random.Random(7).choices(keys, k=LOOKUPS)  # noqa: S311 - a sample, not a secret


async def drop(url: URL) -> None:
    admin = await asyncpg.connect(_dsn(url))
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await admin.close()


async def measure(url: URL) -> str:
    """Lookups in short interleaved batches; then bulk inserts, each round running every one
    once, in turn. The best of each is kept."""
    user_id, ids = await prepare(url)
    scratch = url.set(database=DATABASE)
    asyncpg_url, psycopg_url = (scratch.set(drivername=f"postgresql+{d}") for d in DRIVERS)
    rounds: dict[str, list[float]] = {}
    try:
        async with AsyncExitStack() as stack:
            contexts = {
                "raw get": raw_lookups(scratch),
                "core get": core_lookups(asyncpg_url),
                "session get": orm_lookups(asyncpg_url, "session"),
                "floor get": orm_lookups(asyncpg_url, "floor"),
                "peer get": orm_lookups(asyncpg_url, "peer"),
                "asyncpg get": orm_lookups(asyncpg_url, "repository"),
                "psycopg get": orm_lookups(psycopg_url, "repository"),
            }
            lookups = {name: await stack.enter_async_context(c) for name, c in contexts.items()}
            best = await interleaved_lookups(lookups, ids)
        for _ in range(ROUNDS):
            for name, result in [
                ("raw copy", await raw_bulk(scratch, user_id)),
                ("asyncpg copy", await repository_bulk(asyncpg_url, user_id)),
                ("psycopg copy", await repository_bulk(psycopg_url, user_id)),
            ]:
                rounds.setdefault(name, []).append(result)
        server = await _server_version(url)
    finally:
        await drop(url)
    best.update({name: max(values) for name, values in rounds.items()})
    return table(best, server)


# Repository.get / a floor or peer, in time: at most this much (the others have no target).
# The floor's target is the hook's promise: it costs nothing where it changes nothing (tasks).
GET_TARGETS = {"core get": 1.5, "session get": 0.8, "floor get": 1.05}


def table(best: dict[str, float], server: str) -> str:
    raw_copy, get_a, copy_a = best["raw copy"], best["asyncpg get"], best["asyncpg copy"]
    get_p, copy_p = best["psycopg get"], best["psycopg copy"]
    lines = [
        "| get by id, per lookup (asyncpg) | time | `Repository.get` / this | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, label in [
        ("raw get", "raw asyncpg, a prepared `fetchrow`"),
        ("core get", "SQLAlchemy Core, `conn.execute(select(...))`"),
        ("session get", "plain `AsyncSession.get(Task, id)`"),
        ("floor get", "the same statement, no `do_orm_execute` listener (the ORM's floor)"),
        ("peer get", "advanced-alchemy `repository.get(id)` (peer)"),
        ("asyncpg get", "**`Repository.get(id)`** (this guide)"),
    ]:
        ratio, target = get_a / best[name], GET_TARGETS.get(name)
        shown = f"≤ {target}x" if target else "n/a"
        met = _yes(ratio <= target) if target else "n/a"
        lines.append(f"| {label} | {best[name] * 1e3:.3f} ms | {ratio:.2f}x | {shown} | {met} |")
    lines += [
        "",
        "| bulk insert | raw asyncpg (COPY) | repository | repository / raw | target | met |",
        "|---|---|---|---|---|---|",
        f"| bulk_create {ROWS:,} rows | {raw_copy:,.0f} rows/s | {copy_a:,.0f} rows/s "
        f"| {copy_a / raw_copy:.2f}x the throughput | ≥ 0.8x | {_yes(copy_a / raw_copy >= 0.8)} |",
        "",
        "| through the same repository code | asyncpg | psycopg | psycopg / asyncpg |",
        "|---|---|---|---|",
        f"| get by id (per lookup) | {get_a * 1e3:.3f} ms | {get_p * 1e3:.3f} ms "
        f"| {get_p / get_a:.2f}x the time |",
        f"| bulk_create {ROWS:,} rows | {copy_a:,.0f} rows/s | {copy_p:,.0f} rows/s "
        f"| {copy_p / copy_a:.2f}x the throughput |",
        "",
        f"Lookups: the best of {LOOKUPS // BATCH} interleaved batches of {BATCH} random rows "
        "among 10,000, a session per batch, emptied after each lookup (every row built anew); "
        f"bulk inserts: the best of {ROUNDS} interleaved rounds. PostgreSQL {server} on "
        "127.0.0.1; "
        f"asyncpg {version('asyncpg')}, psycopg "
        f"{version('psycopg')}, SQLAlchemy {version('sqlalchemy')}, advanced-alchemy "
        f"{version('advanced-alchemy')}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs ({platform.machine()}). "
        "Recorded by `make bench`.",
        "",
        _floor_sentence(best["floor get"] / best["core get"]),
    ]
    return "\n".join(lines) + "\n"


def _floor_sentence(floor: float) -> str:
    """What the Core ratio means on this run: the ORM alone, with no hook, is `floor`x Core."""
    limit = GET_TARGETS["core get"]
    verdict = (
        f"above the ≤ {limit}x Core target, so no repository over the ORM can meet that target here"
        if floor > limit
        else f"within the ≤ {limit}x Core target"
    )
    return (
        f"Building the ORM object is the gap to Core: with no listener at all, the same lookup "
        f"takes {floor:.2f}x Core on this run, {verdict}."
    )


async def _server_version(url: URL) -> str:
    conn = await asyncpg.connect(_dsn(url))
    try:
        return str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


if __name__ == "__main__":
    record(measure, "repositories")
