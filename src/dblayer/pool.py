"""Seeing and sizing the connection pool: status, checkouts held too long, a budget, fork safety.

The pool itself is configured in `engine.create_engine` from the settings; this module is what an
operator needs around it: what the pool holds right now, which code keeps a connection too long
(HikariCP calls it leak detection), whether `pool_size + max_overflow` fits the server's
`max_connections` across every worker, and how a forked child gets a pool of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

logger = logging.getLogger(__name__)


# --8<-- [start:status]
@dataclass(frozen=True)
class PoolStatus:
    """What the pool holds now. `overflow` counts connections beyond `size` (negative: room)."""

    pool: str
    size: int
    checked_in: int
    checked_out: int
    overflow: int

    def __str__(self) -> str:
        return (
            f"{self.pool}: size {self.size}, {self.checked_out} checked out, "
            f"{self.checked_in} idle, overflow {self.overflow}"
        )


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """A snapshot of the engine's pool (all zeros for `NullPool`, which keeps nothing)."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return PoolStatus(
            type(pool).__name__, pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()
        )
    return PoolStatus(type(pool).__name__, 0, 0, 0, 0)
    # --8<-- [end:status]


# --8<-- [start:watch]
@dataclass
class CheckoutWatch:
    """Reports (a logged warning by default) each connection returned to the pool after more than
    `threshold` seconds, naming the line that checked it out; `held_now()` lists those still out."""

    engine: AsyncEngine
    threshold: float
    report: Callable[[str], object] = logger.warning
    _out: dict[int, tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        event.listen(self.engine.sync_engine, "checkout", self._checkout)
        event.listen(self.engine.sync_engine, "checkin", self._checkin)

    def remove(self) -> None:
        event.remove(self.engine.sync_engine, "checkout", self._checkout)
        event.remove(self.engine.sync_engine, "checkin", self._checkin)

    def held_now(self) -> list[tuple[float, str]]:
        """(seconds, where) of every checkout older than the threshold that is still out."""
        now = time.monotonic()
        held = [(now - started, where) for started, where in self._out.values()]
        return sorted((item for item in held if item[0] > self.threshold), reverse=True)

    def _checkout(
        self, dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        self._out[id(record)] = (time.monotonic(), _caller())

    def _checkin(self, dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        started, where = self._out.pop(id(record), (time.monotonic(), "?"))
        held = time.monotonic() - started
        if held > self.threshold:
            self.report(
                f"connection held for {held:.1f} s (threshold {self.threshold:.1f} s), "
                f"checked out at {where}"
            )
            # --8<-- [end:watch]


def _caller() -> str:
    """The innermost frame of the checking-out task outside SQLAlchemy and asyncio.

    The checkout runs in SQLAlchemy's greenlet, whose stack does not reach the caller; the asyncio
    task's own stack does.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop: a synchronous caller
        task = None
    frames = task.get_stack() if task is not None else []
    for frame in reversed(frames):
        filename = frame.f_code.co_filename
        if not any(part in filename for part in _LIBRARY_PATHS):
            return f"{os.path.basename(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    return "?"


_LIBRARY_PATHS = ("sqlalchemy", "asyncio", os.path.join("dblayer", "pool.py"))


# --8<-- [start:plan]
@dataclass(frozen=True)
class PoolPlan:
    """How many connections each worker process may open, and whether a configuration fits."""

    max_connections: int
    reserved: int
    workers: int  # processes across all hosts, each with its own engine and pool
    per_worker: int  # the budget: (max_connections - reserved) // workers
    pool_size: int
    max_overflow: int

    @property
    def worst_case(self) -> int:
        return self.workers * (self.pool_size + self.max_overflow)

    @property
    def fits(self) -> bool:
        return self.worst_case <= self.max_connections - self.reserved

    def explain(self) -> str:
        available = self.max_connections - self.reserved
        verdict = "fits" if self.fits else f"does NOT fit: at most {self.per_worker} per worker"
        return (
            f"{self.workers} workers x (pool_size {self.pool_size} + max_overflow "
            f"{self.max_overflow}) = {self.worst_case} connections at worst; the server allows "
            f"{available} ({self.max_connections} max_connections - {self.reserved} reserved): "
            f"{verdict}"
        )


def plan_pool(
    *,
    max_connections: int,
    reserved: int,
    workers_per_host: int,
    hosts: int = 1,
    pool_size: int | None = None,
    max_overflow: int | None = None,
) -> PoolPlan:
    """Check a configuration against the server's limit, or propose one when none is given.

    The proposal keeps a third of each worker's budget as overflow for bursts.
    """
    workers = workers_per_host * hosts
    if workers < 1:
        raise ValueError("workers_per_host and hosts must be at least 1")
    per_worker = (max_connections - reserved) // workers
    if per_worker < 1 and pool_size is None:
        raise ValueError(
            f"{workers} workers cannot share {max_connections - reserved} connections: "
            "use fewer workers, a larger max_connections, or an external pooler"
        )
    if pool_size is None:
        max_overflow = per_worker // 3 if max_overflow is None else max_overflow
        pool_size = max(1, per_worker - max_overflow)
    return PoolPlan(
        max_connections=max_connections,
        reserved=reserved,
        workers=workers,
        per_worker=per_worker,
        pool_size=pool_size,
        max_overflow=0 if max_overflow is None else max_overflow,
    )


async def server_limits(conn: AsyncConnection) -> tuple[int, int]:
    """(max_connections, connections reserved for superusers and `pg_use_reserved_connections`)."""
    settings = await conn.execute(
        text(
            "SELECT name, setting::int FROM pg_settings WHERE name IN "
            "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
        )
    )
    values: dict[str, int] = {name: value for name, value in settings}
    reserved = values.get("superuser_reserved_connections", 0) + values.get(
        "reserved_connections",
        0,  # PostgreSQL 16+
    )
    return values["max_connections"], reserved
    # --8<-- [end:plan]


# --8<-- [start:fork]
_inherited: list[object] = []  # the parent's pools, in a forked child: kept, never collected


def dispose_in_child(engine: AsyncEngine) -> None:
    """After `os.fork()`, forget the parent's pooled connections without closing them.

    A child must never use, or close, a socket it inherited: closing would end the parent's
    session too. `dispose(close=False)` starts an empty pool; the old one is kept referenced, not
    collected: collecting an asyncpg connection aborts it on the parent's event loop, whose epoll
    the child shares, and takes its socket out of the parent's loop too. (A child ending in
    `os._exit`, as multiprocessing's do, never collects them.)
    """

    def forget() -> None:
        _inherited.append(engine.sync_engine.pool)
        engine.sync_engine.dispose(close=False)

    os.register_at_fork(after_in_child=forget)
    # --8<-- [end:fork]
