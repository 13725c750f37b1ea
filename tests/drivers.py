"""The quick loop's `--one-driver-each`: every test and block that runs once per driver runs under
one of them, chosen per test from its id, so that the loop takes half the time and both drivers
are still exercised across the suite. A test about the drivers' difference (their errors, their
own code paths) is marked `both_drivers` and runs under both anyway. `make test FULL=1` (and
`.ci/run`) runs everything under both, and only such a run records what it verified for the site
(tests/report.py counts the blocks)."""

from __future__ import annotations

import re
import zlib
from collections import defaultdict

import pytest

from dblayer.settings import DRIVERS
from tests.blocks import FenceSettings, name

OPTION = "--one-driver-each"


def chosen(key: str, allowed: tuple[str, ...] = DRIVERS) -> str:
    """The driver a test runs under in the quick loop: the same one in every run and process
    (xdist's workers must collect the same tests), alternating between tests by a hash of the id."""
    return allowed[zlib.crc32(key.encode()) % len(allowed)]


def one_driver_each(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """Split `items` into those to run and those to leave out: of each test's runs per driver,
    the chosen one (for a block that runs under one driver only, that one)."""
    groups: dict[str, dict[str, pytest.Item]] = defaultdict(dict)
    for item in items:
        driver = _driver(item)
        if driver is not None and item.get_closest_marker("both_drivers") is None:
            groups[_without_driver(item.nodeid, driver)][driver] = item
    left_out = set()
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        keep = chosen(key, _allowed(next(iter(runs.values()))))
        left_out |= {id(item) for driver, item in runs.items() if driver != keep}
    kept = [item for item in items if id(item) not in left_out]
    return kept, [item for item in items if id(item) in left_out]


def _driver(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    driver = callspec.params.get("driver") if callspec is not None else None
    return driver if driver in DRIVERS else None


def _without_driver(nodeid: str, driver: str) -> str:
    """The id shared by a test's runs under each driver: its own with the driver's part removed
    (`…[docs/engine.md:12-30-psycopg]`, `…[psycopg-silent]`, `…[psycopg]`)."""
    return re.sub(rf"(?<=[\[-]){driver}(?=[\]-])", "<driver>", nodeid)


def _allowed(item: pytest.Item) -> tuple[str, ...]:
    """The drivers a page's block runs under (its fence may name one); every driver otherwise."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    block = params.get("example", params.get("block"))
    if block is None:
        return DRIVERS
    return FenceSettings.parse(block.prefix, name(block)).drivers
