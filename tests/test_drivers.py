"""The quick loop's one driver per test (tests/drivers.py): nothing is lost, both drivers run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dblayer.settings import DRIVERS
from tests.drivers import OPTION, chosen, one_driver_each
from tests.left_out import LEFT_OUT_FILE
from tests.paths import ROOT


@dataclass
class Collected:
    """What `one_driver_each` reads of a collected test: its id, parameters and markers."""

    nodeid: str
    params: dict[str, Any] = field(default_factory=dict)
    markers: tuple[str, ...] = ()

    @property
    def callspec(self) -> SimpleNamespace:
        return SimpleNamespace(params=self.params)

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def split(*items: Collected) -> tuple[list[str], list[str]]:
    kept, left_out = one_driver_each(cast(list[pytest.Item], list(items)))
    return [i.nodeid for i in kept], [i.nodeid for i in left_out]


def pair(test: str, **extra: Any) -> list[Collected]:
    return [Collected(f"{test}[{d}]", {"driver": d}, **extra) for d in DRIVERS]


def test_of_each_pair_one_runs_and_both_drivers_are_chosen_across_tests() -> None:
    items = [item for n in range(20) for item in pair(f"tests/test_x.py::test_{n}")]
    kept, left_out = split(*items)
    assert len(kept) == len(left_out) == 20
    assert {re.sub(r"\[.*", "", k) for k in kept} == {
        f"tests/test_x.py::test_{n}" for n in range(20)
    }
    assert {k.rsplit("[", 1)[1] for k in kept} == {f"{d}]" for d in DRIVERS}


def test_the_choice_is_the_same_in_every_process() -> None:
    """xdist's workers must collect the same tests: no randomness, no per-process hash seed."""
    assert chosen("tests/test_x.py::test_1[<driver>]") == chosen(
        "tests/test_x.py::test_1[<driver>]"
    )
    script = "from tests.drivers import chosen; print(chosen('tests/test_x.py::test_1[<driver>]'))"
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == chosen("tests/test_x.py::test_1[<driver>]")


def test_tests_without_a_driver_and_tests_about_both_keep_every_run() -> None:
    plain = Collected("tests/test_x.py::test_plain")
    kept, left_out = split(plain, *pair("tests/test_x.py::test_both", markers=("both_drivers",)))
    assert kept == [
        "tests/test_x.py::test_plain",
        *(f"tests/test_x.py::test_both[{d}]" for d in DRIVERS),
    ]
    assert left_out == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_block_for_one_driver_runs_under_that_one(driver: str) -> None:
    block = SimpleNamespace(
        prefix=f'{{.python drivers="{driver}" reason="its own error"}}',
        path=ROOT / "docs" / "engine.md",
        start_line=1,
        end_line=9,
    )
    runs = [
        Collected(
            f"tests/test_docs.py::test_python_block[docs/engine.md:1-9-{d}]",
            {"driver": d, "example": block},
        )
        for d in DRIVERS
    ]
    kept, _ = split(*runs)
    assert kept == [f"tests/test_docs.py::test_python_block[docs/engine.md:1-9-{driver}]"]


def _collected(tmp_path: Path) -> tuple[set[str], set[str], int]:
    """The quick loop's tests, the ones it leaves out, and how many pytest collected in all, from
    one collection of the suite."""
    left_out = tmp_path / "left-out.txt"
    left_out.touch()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.left_out",
            OPTION,
        ],
        cwd=ROOT,
        env={**os.environ, LEFT_OUT_FILE: str(left_out)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    # pytest's own count: "1191/1896 tests collected (705 deselected) in 4.39s"
    summary = re.search(r"^(\d+)/(\d+) tests collected \((\d+) deselected\)", out, re.M)
    assert summary, out[-500:]
    run, collected, deselected = map(int, summary.groups())
    quick = {line for line in out.splitlines() if "::" in line}
    left = set(left_out.read_text("utf-8").splitlines())
    assert (len(quick), len(left)) == (run, deselected)
    return quick, left, collected


def _without_drivers(ids: set[str]) -> set[str]:
    return {re.sub(r"(?<=[\[-])(asyncpg|psycopg)(?=[\]-])", "<driver>", i) for i in ids}


def test_the_quick_loop_leaves_no_test_out_entirely(tmp_path: Path) -> None:
    """Every test of the suite still runs under some driver; only second runs are left out."""
    quick, left_out, collected = _collected(tmp_path)
    assert left_out
    assert not quick & left_out
    every = quick | left_out
    assert len(every) == collected  # every test pytest collected is in one of the two
    assert _without_drivers(quick) == _without_drivers(every)
    assert {d for d in DRIVERS if any(d in i for i in quick)} == set(DRIVERS)
