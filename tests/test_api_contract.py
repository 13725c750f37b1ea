"""The API's contract: schemathesis generates requests from the app's own /openapi.json and checks
every answer against it (`--checks all`: undocumented statuses, bodies that break their schema,
valid requests refused, invalid ones accepted, 5xx), on a real database, under both drivers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, from_schema
from schemathesis.engine.events import FatalError, NonFatalError, ScenarioFinished
from schemathesis.python.asgi import shutdown_lifespans
from sqlalchemy import URL

from dblayer.api import create_app
from tests.test_api import settings_for

SEED = 12  # a fixed seed: the same requests every run, so a failure reproduces
CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": 10, "database": "none"},
    "checks": {"enabled": True},  # all of them
    "workers": 1,
}


def contract_failures(app: object) -> list[str]:
    """Run every phase (examples, coverage, fuzzing, stateful) against `app` in-process; return
    one line per failed check."""
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, FatalError | NonFatalError):
            failures.append(f"error: {event}")
        if isinstance(event, ScenarioFinished) and event.status != Status.SUCCESS:
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"{event.recorder.label}: {check.name}: {failure.title}: {failure.message}")
    return sorted(set(failures))


@pytest.fixture
def app_on_database(database_url: URL) -> Iterator[object]:
    yield create_app(settings_for(database_url))
    shutdown_lifespans()  # the engine is disposed before the test's database is dropped


def test_the_api_keeps_its_contract(app_on_database: object) -> None:
    failures = contract_failures(app_on_database)
    assert not failures, "\n".join(failures)
