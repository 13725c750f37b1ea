"""The pool against a real server: status, exhaustion, restarts, leak watch, sizing, fork safety."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import URL, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from dblayer.embedded import EmbeddedPostgres
from dblayer.engine import connect_args, create_engine
from dblayer.pool import CheckoutWatch, _caller, plan_pool, pool_status, server_limits
from dblayer.settings import Driver, SettingsError, get_settings
from tests.apps import settings_for


async def test_pool_settings_reach_the_pool(database_url: URL) -> None:
    engine = create_engine(
        settings_for(database_url, db_pool_size=2, db_max_overflow=1, db_pool_use_lifo=True)
    )
    try:
        assert pool_status(engine).size == 2
        assert engine.pool._pool.use_lifo is True  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 1  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


def test_unlimited_overflow_is_refused_with_the_reason() -> None:
    with pytest.raises(SettingsError, match=r"DB_MAX_OVERFLOW: .*-1 \(no limit\) is refused"):
        get_settings(db_max_overflow=-1)


async def test_exhaustion_fails_within_the_timeout(database_url: URL) -> None:
    engine = create_engine(
        settings_for(database_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.3)
    )
    try:
        async with engine.connect():
            started = time.monotonic()
            with pytest.raises(exc.TimeoutError, match="QueuePool limit of size 1 overflow 0"):
                async with engine.connect():
                    pass  # pragma: no cover - never reached
            waited = time.monotonic() - started
        assert 0.25 < waited < 2.0  # about pool_timeout, never a hang
        assert pool_status(engine).checked_out == 0
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def restartable() -> Iterator[EmbeddedPostgres]:
    """A server of its own: restarting the shared one would cut every other test's connections."""
    with EmbeddedPostgres() as server:
        yield server


@pytest.mark.parametrize("pre_ping", [True, False])
async def test_a_server_restart_with_pooled_connections(
    restartable: EmbeddedPostgres, driver: Driver, pre_ping: bool
) -> None:
    engine = create_engine(
        settings_for(restartable.url(driver=driver), db_pool_size=3, db_pool_pre_ping=pre_ping)
    )
    try:
        await asyncio.gather(*(_query(engine, 0.1) for _ in range(3)))  # three pooled connections
        assert pool_status(engine).checked_in == 3
        await asyncio.to_thread(restartable.restart)
        results = [await _try_query(engine) for _ in range(20)]
    finally:
        await engine.dispose()
    if pre_ping:
        assert results == ["ok"] * 20  # zero failed queries after the restart
    else:
        # Without pre-ping the pool hands out the dead connections; each fails once, is discarded.
        assert 1 <= results.count("failed") <= 3
        assert results[-1] == "ok"


async def _query(engine: AsyncEngine, seconds: float = 0) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


async def _try_query(engine: AsyncEngine) -> str:
    try:
        await _query(engine)
    except exc.DBAPIError as error:
        return "failed" if error.connection_invalidated else f"unexpected: {error}"
    return "ok"


async def test_external_pooler_mode(database_url: URL, driver: Driver) -> None:
    settings = settings_for(database_url, db_external_pooler=True)
    engine = create_engine(settings)
    try:
        assert isinstance(engine.pool, NullPool)
        assert str(pool_status(engine)) == "NullPool: size 0, 0 checked out, 0 idle, overflow 0"
        pids = set()
        for _ in range(3):
            async with engine.begin() as conn:
                pids.add(await conn.scalar(text("SELECT pg_backend_pid()")))
                # Parameters still work with statement caching and preparing turned off.
                assert await conn.scalar(text("SELECT CAST(:x AS int) + 1"), {"x": 41}) == 42
        assert len(pids) == 3
    finally:
        await engine.dispose()
    args = connect_args(settings)
    if driver == "asyncpg":
        assert args["statement_cache_size"] == 0
        assert args["prepared_statement_cache_size"] == 0
        names = {args["prepared_statement_name_func"]() for _ in range(2)}
        assert len(names) == 2
    else:
        assert args["prepare_threshold"] is None


async def test_checkout_watch_reports_long_checkouts(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(settings_for(database_url))
    watch = CheckoutWatch(engine, threshold=0.1)  # default report: a logged warning
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # quick: not reported
        async with engine.connect() as conn:
            await asyncio.sleep(0.2)
            held = watch.held_now()
            assert len(held) == 1
            assert held[0][1].startswith("test_pool.py:")
            assert held[0][1].endswith("in test_checkout_watch_reports_long_checkouts")
        assert watch.held_now() == []
        watch.remove()
        async with engine.connect() as conn:
            await asyncio.sleep(0.2)  # no longer watched
    finally:
        await engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # 0.2 s and the rollback on return: more than 0.2 s, by how much depends on the machine
    assert re.match(
        r"connection held for 0\.[2-9] s \(threshold 0\.1 s\), checked out at ", warnings[0]
    )


def test_caller_outside_a_task() -> None:
    assert _caller() == "?"


async def test_caller_when_every_frame_is_library_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dblayer.pool._LIBRARY_PATHS", ("",))
    assert _caller() == "?"


async def test_a_checkin_without_a_recorded_checkout_is_ignored(database_url: URL) -> None:
    engine = create_engine(settings_for(database_url))
    try:
        async with engine.connect() as conn:
            watch = CheckoutWatch(engine, threshold=0)  # started while a connection was out
            await conn.execute(text("SELECT 1"))
        assert watch.held_now() == []
        watch.remove()
    finally:
        await engine.dispose()


async def test_server_limits(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        max_connections, reserved = await server_limits(conn)
        expected = await conn.scalar(text("SELECT current_setting('max_connections')::int"))
    assert max_connections == expected
    assert reserved >= 3  # superuser_reserved_connections defaults to 3


def test_plan_checks_a_configuration() -> None:
    plan = plan_pool(
        max_connections=100, reserved=3, workers_per_host=4, hosts=3, pool_size=5, max_overflow=10
    )
    assert (plan.workers, plan.worst_case, plan.per_worker, plan.fits) == (12, 180, 8, False)
    assert "does NOT fit: at most 8 per worker" in plan.explain()
    small = plan_pool(max_connections=100, reserved=3, workers_per_host=2, pool_size=5)
    assert (small.max_overflow, small.worst_case, small.fits) == (0, 10, True)
    assert small.explain().endswith(": fits")


def test_plan_proposes_a_configuration_within_the_budget() -> None:
    plan = plan_pool(max_connections=100, reserved=3, workers_per_host=4, hosts=3)
    assert (plan.pool_size, plan.max_overflow) == (6, 2)
    assert plan.fits
    fixed_overflow = plan_pool(
        max_connections=100, reserved=3, workers_per_host=4, hosts=3, max_overflow=0
    )
    assert (fixed_overflow.pool_size, fixed_overflow.max_overflow) == (8, 0)
    one = plan_pool(max_connections=10, reserved=3, workers_per_host=7)
    assert (one.pool_size, one.max_overflow, one.fits) == (1, 0, True)


def test_plan_refuses_impossible_budgets() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        plan_pool(max_connections=100, reserved=3, workers_per_host=0)
    with pytest.raises(ValueError, match=r"cannot share 7 connections: .*external pooler"):
        plan_pool(max_connections=10, reserved=3, workers_per_host=8)


# A pre-forking server's master: it uses the engine on an event loop it keeps, forks, and uses it
# again after the child (which connects on a loop of its own) is gone.
_FORK = """
import asyncio, os, sys
from sqlalchemy import text
from dblayer.engine import create_engine
from dblayer.pool import dispose_in_child

engine = create_engine()
dispose_in_child(engine)

async def backend_pid():
    async with engine.connect() as conn:
        return await conn.scalar(text("SELECT pg_backend_pid()"))

async def child_work():
    pid = await backend_pid()
    await engine.dispose()
    return pid

with asyncio.Runner() as runner:
    parent = runner.run(backend_pid())
    child = os.fork()
    if child == 0:
        os._exit(0 if asyncio.run(child_work()) != parent else 1)
    _, status = os.waitpid(child, 0)
    print("child", os.waitstatus_to_exitcode(status))
    print("parent", runner.run(asyncio.wait_for(backend_pid(), 10)) == parent)
    runner.run(engine.dispose())
"""


def test_a_forked_child_leaves_the_parents_connections_working(database_url: URL) -> None:
    """The child gets connections of its own, and the parent's pooled connection still answers
    after the child has gone: under asyncpg, collecting an inherited connection in the child
    unregistered its socket from the event loop's epoll, which parent and child share, and the
    parent's next query waited forever (seen running docs/pooling-production.md as a script)."""
    env = {**os.environ, "DATABASE_URL": database_url.render_as_string(hide_password=False)}
    result = subprocess.run(
        [sys.executable, "-c", _FORK], env=env, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (0, "child 0\nparent True\n"), result.stderr


def test_dispose_in_child_keeps_the_parents_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook itself (it runs in a child, where coverage is not recorded): a new empty pool,
    the parent's kept referenced."""
    from dblayer import pool

    hooks: list[Callable[[], None]] = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kw: hooks.append(kw["after_in_child"]))
    monkeypatch.setattr(pool, "_inherited", [])
    engine = create_engine(get_settings())
    parents = engine.sync_engine.pool
    pool.dispose_in_child(engine)
    hooks[0]()
    assert engine.sync_engine.pool is not parents
    assert pool._inherited == [parents]
