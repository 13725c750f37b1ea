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

QUERIES = 300


async def per_query(engine: AsyncEngine, queries: int) -> float:
    """Seconds per checkout + `SELECT 1` + return, after one warm-up query."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    started = time.perf_counter()
    for _ in range(queries):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    return (time.perf_counter() - started) / queries


async def measure(url: str) -> list[tuple[str, float, float]]:
    rows = []
    for driver in ("asyncpg", "psycopg"):
        driver_url = make_url(url).set(drivername=f"postgresql+{driver}")
        pooled = create_async_engine(driver_url, pool_pre_ping=True)
        unpooled = create_async_engine(driver_url, poolclass=NullPool)
        try:
            rows.append(
                (driver, await per_query(pooled, QUERIES), await per_query(unpooled, QUERIES))
            )
        finally:
            await pooled.dispose()
            await unpooled.dispose()
    return rows


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
        f"{QUERIES} queries each; PostgreSQL {server} on 127.0.0.1 with password authentication "
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
