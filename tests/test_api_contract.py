"""The API's contract: schemathesis generates requests from the app's own /openapi.json and checks
every answer against it (`--checks all`: undocumented statuses, bodies that break their schema,
valid requests refused, invalid ones accepted, 5xx), on a real database, under both drivers."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis import HookContext
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import FatalError, NonFatalError, ScenarioFinished
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.python import asgi
from schemathesis.python.asgi import shutdown_lifespans
from sqlalchemy import URL

from dblayer.api import create_app
from dblayer.api.schemas import CURSOR
from dblayer.repositories import TaskRepository
from tests.apps import client_for, new_user, settings_for

SEED = 12  # a fixed seed: the same requests every run, so a failure reproduces
CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": 10, "database": "none"},
    "checks": {"enabled": True},  # all of them
    "workers": 1,
}


SORTS = [sign + field for field in TaskRepository.sortable for sign in ("", "-")]


async def issued_cursors(app: FastAPI) -> dict[str, str]:
    """A cursor the app issued for each sort order, asked for as a client would."""
    async for client in client_for(app):
        user = await new_user(client)
        for title in ("first", "second"):
            await client.post("/tasks", json={"user_id": user["id"], "title": title})
        pages = [await client.get("/tasks", params={"sort": s, "limit": 1}) for s in SORTS]
        return {sort: page.json()["next_cursor"] for sort, page in zip(SORTS, pages, strict=True)}
    raise AssertionError("unreachable")  # pragma: no cover


def run_contract(app: FastAPI) -> tuple[list[str], set[str]]:
    """Run every phase (examples, coverage, fuzzing, stateful) against `app` in-process; return
    one line per failed check, and the operations tested."""
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    cursors = asyncio.run(issued_cursors(app))

    def before_call(
        context: HookContext, case: schemathesis.Case[Any], kwargs: dict[str, Any]
    ) -> None:
        """The one thing a schema cannot say: which cursors the server issued (and for which
        sort). A cursor the schema allows becomes one the app issued for the request's sort;
        one the schema refuses is left alone, so a negative test still sends it."""
        query = case.query if case.operation.label == "GET /tasks" else None
        cursor = (query or {}).get("cursor")
        if (
            query
            and isinstance(cursor, str)
            and re.fullmatch(CURSOR, cursor)
            and len(cursor) <= 500
        ):
            sort = query.get("sort")
            query["cursor"] = cursors.get(sort if isinstance(sort, str) else "created_at", cursor)

    failures: list[str] = []
    schemathesis.hook(before_call)  # every phase calls it (the coverage phase skips `map_query`)
    try:
        events = list(from_schema(schema).execute())
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)
    tested: set[str] = set()
    for event in events:
        if isinstance(event, FatalError | NonFatalError):
            failures.append(f"error: {event}")
        if not isinstance(event, ScenarioFinished):
            continue
        recorder = event.recorder
        if event.status != Status.SKIP:
            tested.add(recorder.label)
        found = [
            (case_id, check.failure_info)
            for case_id, checks in recorder.checks.items()
            for check in checks
            if check.failure_info is not None
        ]
        if event.status not in {Status.SUCCESS, Status.SKIP} and not found:
            failures.append(f"{recorder.label}: {event.status}")
        for case_id, info in found:
            interaction = recorder.interactions.get(case_id)
            response = interaction.response if interaction else None
            answer = f"{response.status_code} {response.text[:300]}" if response else "-"
            failures.append(
                f"{recorder.label}: {info.failure.title}\n  {info.code_sample}\n  answered {answer}"
            )
    return sorted(set(failures)), tested


@pytest.fixture
def app_on_database(database_url: URL) -> Iterator[FastAPI]:
    threads = set(threading.enumerate())
    yield create_app(settings_for(database_url))
    shutdown_lifespans()  # the engine is disposed before the test's database is dropped
    # Schemathesis keeps its event loop thread for the rest of the process; stop it. A signal
    # sent to the process (test_embedded's SIGTERM) may otherwise be delivered to that thread,
    # leaving the main thread blocked in a wait that the signal was meant to interrupt.
    asgi._shutdown()
    for thread in set(threading.enumerate()) - threads:
        thread.join(timeout=10)
    assert set(threading.enumerate()) <= threads


@pytest.mark.slow  # ten seconds a driver: .ci/run (make test SLOW=1) runs it
def test_the_api_keeps_its_contract(app_on_database: FastAPI) -> None:
    failures, tested = run_contract(app_on_database)
    assert not failures, "\n".join(failures)
    paths = app_on_database.openapi()["paths"]
    operations = {f"{method.upper()} {path}" for path in paths for method in paths[path]}
    assert operations <= tested, operations - tested  # a new route is held to it too
