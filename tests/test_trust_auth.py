"""The suite on a reader's server that trusts every connection, as the official image does with
POSTGRES_HOST_AUTH_METHOD=trust: a wrong password cannot fail there, so the tests and the block
that show one failing are skipped with one line each; nothing else fails and nothing hangs.

It runs the modules that try a wrong password (and the engine page) in a pytest of their own,
against an embedded server started with `auth="trust"`. `.ci/run` runs the whole suite that way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from dblayer.embedded import EmbeddedPostgres
from tests.databases import NO_PASSWORD_AUTH
from tests.paths import ROOT

LONGEST_FIRST = True  # see conftest: start the slow ones first
# A pytest of its own: .ci/run (make test SLOW=1) runs it; on a busy machine it takes minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SELECTION = [
    "tests/test_engine.py",
    "tests/test_prestart.py",
    "tests/test_api_served.py",
    "tests/test_api_errors.py",
    "tests/test_docs.py",
    "-k",
    "not test_docs or engine",  # of the pages, only the engine's (it shows a wrong password)
]
# What only a server that refuses a wrong password can show.
NEEDS_PASSWORD_AUTH = {
    f"{test}[{driver}]"
    for test in ("test_wrong_password", "test_wrong_password_fails_at_once_without_retrying")
    for driver in ("asyncpg", "psycopg")
} | {
    f"{test}[{driver}-password]"
    for test in (
        "test_a_failed_connect_is_database_unavailable_under_both_drivers",
        "test_a_failed_connect_is_503_under_both_drivers",
    )
    for driver in ("asyncpg", "psycopg")
}


@pytest.fixture(scope="module")
def trusting_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(auth="trust") as server:
        yield server


def test_the_suite_passes_on_a_server_with_trust_authentication(
    trusting_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = trusting_server.url("postgres").set(drivername="postgresql")
    assert url.password is None  # as a reader writes it for such a server
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTEST_", "DBLAYER_TEST_", "COV_CORE_"))
    }
    env["TEST_DATABASE_URL"] = url.render_as_string(hide_password=False)
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "--timeout",
            "30",  # a hang (the old failure) becomes a failure within this test's own limit
            f"--junitxml={report}",
            *SELECTION,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    skipped = {
        case.get("name", ""): skip.get("message", "")
        for case in ElementTree.parse(report).iter("testcase")  # noqa: S314 - pytest wrote it
        if (skip := case.find("skipped")) is not None
    }
    trust_skips = {name for name, message in skipped.items() if message == NO_PASSWORD_AUTH}
    assert trust_skips == NEEDS_PASSWORD_AUTH | {
        name for name in skipped if name.startswith("test_python_block[docs/engine.md:")
    }
    assert len(trust_skips) == 10
    # Every other skip is a block's exemption, as on any server.
    assert all(
        message.startswith("exempt: ")
        for name, message in skipped.items()
        if name not in trust_skips
    )
    assert "passed" in result.stdout.splitlines()[-1]
