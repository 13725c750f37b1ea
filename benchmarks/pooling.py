"""What a pooled connection saves: `SELECT 1` through the pool vs `NullPool`, in one run.

Run with `make bench`. Uses `DATABASE_URL` when set, else starts an embedded PostgreSQL. Writes
docs/.bench/pooling.md, which the pooling page includes; prints the same table.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version

from sqlalchemy import URL, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from benchmarks.recording import record

QUERIES = 300  # per measure, in batches of BATCH taken in turn with the other measures
BATCH = 20


async def per_query(engine: AsyncEngine, queries: int) -> float:
    """Seconds per checkout + `SELECT 1` + return."""
    started = time.perf_counter()
    for _ in range(queries):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    return (time.perf_counter() - started) / queries


async def measure(url: str) -> list[tuple[str, float, float]]:
    """Every measure (pooled and NullPool, under each driver) in short batches, in turn: a busy
    moment of the machine falls on one batch of each. The best batch of each is kept."""
    engines = {}
    for driver in ("asyncpg", "psycopg"):
        driver_url = make_url(url).set(drivername=f"postgresql+{driver}")
        engines[driver, "pooled"] = create_async_engine(driver_url, pool_pre_ping=True)
        engines[driver, "unpooled"] = create_async_engine(driver_url, poolclass=NullPool)
    try:
        for engine in engines.values():
            await per_query(engine, 1)  # the first connection, the dialect's first queries
        best = dict.fromkeys(engines, float("inf"))
        for _ in range(QUERIES // BATCH):
            for key, engine in engines.items():
                best[key] = min(best[key], await per_query(engine, BATCH))
    finally:
        for engine in engines.values():
            await engine.dispose()
    return [(d, best[d, "pooled"], best[d, "unpooled"]) for d in ("asyncpg", "psycopg")]


def table(rows: list[tuple[str, float, float]], server: str) -> str:
    lines = [
        "| driver | pooled (pre-ping on) | NullPool (connect per query) | NullPool / pooled |",
        "|---|---|---|---|",
    ]
    for driver, pooled, unpooled in rows:
        lines.append(
            f"| {driver} {version(driver)} | {pooled * 1e3:.2f} ms | {unpooled * 1e3:.2f} ms "
            f"| {unpooled / pooled:.1f}x |"
        )
    lines.append("")
    lines.append(
        f"The best of {QUERIES // BATCH} interleaved batches of {BATCH} queries each; PostgreSQL "
        f"{server} on 127.0.0.1 with password authentication "
        f"(SCRAM); SQLAlchemy {version('sqlalchemy')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}). Recorded by `make bench`."
    )
    return "\n".join(lines) + "\n"


async def server_version(url: str) -> str:
    engine = create_async_engine(make_url(url).set(drivername="postgresql+asyncpg"))
    async with engine.connect() as conn:
        result = str(await conn.scalar(text("SHOW server_version")))
    await engine.dispose()
    return result.split()[0]


async def measure_and_tabulate(url: URL) -> str:
    raw = url.render_as_string(hide_password=False)
    return table(await measure(raw), await server_version(raw))


if __name__ == "__main__":
    record(measure_and_tabulate, "pooling")
