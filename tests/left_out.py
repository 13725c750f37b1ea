"""A pytest plugin for tests/test_drivers.py: writes the ids of the tests the run leaves out
(`pytest_deselected`: the quick loop's second drivers) to the file named by LEFT_OUT_FILE, so that
one collection shows both what runs and what does not."""

from __future__ import annotations

import os

import pytest

LEFT_OUT_FILE = "DBLAYER_LEFT_OUT_FILE"


def pytest_deselected(items: list[pytest.Item]) -> None:
    with open(os.environ[LEFT_OUT_FILE], "a", encoding="utf-8") as file:
        file.writelines(f"{item.nodeid}\n" for item in items)
