"""The run report, a pytest plugin (`pytest_plugins` in conftest.py): what the docs tests ran,
the summary line, and, after a complete green run, the record the site build shows (`verified`).

It reads the test reports, which xdist forwards from every worker to the controller, so the
controller (or the only process) holds the whole run.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dblayer.settings import DRIVERS
from tests import verified
from tests.blocks import expected_docs_tests
from tests.databases import Server


@dataclass(eq=False)  # a plugin: pluggy keeps it by identity
class Report:
    """What the docs tests ran, gathered from test reports (so from every xdist worker)."""

    server: Server | None = None  # set by conftest once the server answers
    content: str = ""  # the fingerprint of the pages and the package when the run started
    blocks: Counter[str] = field(default_factory=Counter)  # per driver
    consoles: Counter[str] = field(default_factory=Counter)  # per driver
    exemptions: dict[str, str] = field(default_factory=dict)  # block -> reason
    finished: int = 0  # docs tests that passed, or were skipped as exempt
    isolation: dict[str, float] = field(default_factory=dict)  # test -> clone + drop seconds
    recorded: str = ""  # where the record went, for the summary
    tree: dict[str, str] | None = None  # what git showed as changed when the run started
    dirtied: list[str] = field(default_factory=list)  # files the run changed that git sees

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == "isolation_seconds" and isinstance(value, float):
                self.isolation[report.nodeid] = self.isolation.get(report.nodeid, 0) + value
            elif key == "docs" and isinstance(value, dict) and report.when == "call":
                self._add_block(report, value)

    def _add_block(self, report: pytest.TestReport, block: dict[str, str]) -> None:
        if report.failed or (report.skipped and not block["exempt"]):
            return  # a block the server could not show (FenceSettings.needs) verified nothing
        if block["exempt"]:
            self.exemptions[block["block"]] = block["exempt"]
        if report.passed:
            counter = self.blocks if block["kind"] == "python" else self.consoles
            counter[block["driver"]] += 1
        self.finished += 1

    def record(self, config: pytest.Config | None = None) -> verified.Record | None:
        """What this run verified, if it was the whole suite (as `make test` selects it) and ran
        every block of unchanged content (a run on a trusting server skips some, so it records
        nothing; so does a run of some tests only)."""
        if self.server is None or self.finished != expected_docs_tests():
            return None
        if config is not None and not _whole_suite(config):
            return None
        if verified.fingerprint() != self.content:
            return None  # a page or module was edited while the run was going on
        return verified.Record.of_this_run(
            self.content,
            self.server.version,
            blocks={driver: self.blocks[driver] for driver in DRIVERS},
            consoles={driver: self.consoles[driver] for driver in DRIVERS},
            exemptions=len(self.exemptions),
        )

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """A green run that changed what git sees fails; a complete green run writes its
        record (`.cache/verified/pg<major>.json`, git-ignored)."""
        config = session.config
        if hasattr(config, "workerinput") or config.option.update_examples:
            return
        after = working_tree(verified.ROOT)
        if self.tree is not None and after is not None:
            self.dirtied = changed(self.tree, after)
        if exitstatus != 0:
            return
        if self.dirtied:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        record = self.record(config)
        if record is not None:
            self.recorded = record.write().relative_to(verified.ROOT).as_posix()

    def pytest_report_header(self) -> str | None:
        server = self.server
        return None if server is None else f"postgresql: {server.version} ({server.origin})"

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.server is None:
            return
        write = terminalreporter.write_line
        terminalreporter.section("docs")
        for block, reason in sorted(self.exemptions.items()):
            write(f"exempt: {block}: {reason}")
        if self.isolation:
            costs = sorted(self.isolation.values())
            median = costs[len(costs) // 2] * 1000
            write(f"isolation: {len(costs)} databases, median {median:.0f} ms each (clone + drop)")
        if self.recorded:
            write(f"recorded for the site: {self.recorded}")
        elif terminalreporter.config.getoption("--one-driver-each", False):
            write("one driver per test (the quick loop): `make test FULL=1` runs both and records")
        if self.dirtied:
            write(
                "the run changed files git does not ignore (by a test, or by hand while it ran); "
                f"a green run leaves `git status` as it found it: {', '.join(self.dirtied)}",
                red=True,
            )
        blocks = ", ".join(f"{self.blocks[d]} under {d}" for d in DRIVERS)
        consoles = ", ".join(f"{self.consoles[d]} under {d}" for d in DRIVERS)
        write(
            f"python blocks executed: {blocks}; console blocks executed: {consoles}; "
            f"exemptions: {len(self.exemptions)}; server: PostgreSQL {self.server.version} "
            f"({self.server.origin})"
        )


REPORT = pytest.StashKey[Report]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """One report per process, registered as a plugin; the controller's sees the whole run."""
    run = Report(content=verified.fingerprint())
    if not hasattr(config, "workerinput") and not config.option.update_examples:
        run.tree = working_tree(verified.ROOT)
    config.stash[REPORT] = run
    config.pluginmanager.register(run, "dblayer-report")


def working_tree(root: Path) -> dict[str, str] | None:
    """What `git status` shows (changed, new, deleted files, not ignored ones), each with a hash
    of its content, so that a file changed again is seen too. None outside a git checkout."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    state = {}
    entries = iter(status.split(b"\0"))
    for entry in entries:
        if not entry:
            continue
        code, path = entry[:2].decode(), entry[3:].decode()
        if code[0] in "RC":
            next(entries)  # a rename's or copy's source path follows
        file = root / path
        content = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "-"
        state[path] = f"{code} {content}"
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The paths whose state differs between two `working_tree` snapshots."""
    return sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )


def _whole_suite(config: pytest.Config) -> bool:
    """Whether the run selected the whole suite: no test files named, no `-k`, no `--lf`, and no
    marker expression but the quick loop's `not slow` (`make test`); `REPEAT=1`'s ignoring of the
    browser test is allowed (the record is of the blocks, which it runs)."""
    testpaths = [str(path) for path in config.getini("testpaths")]
    return (
        [str(arg) for arg in config.args] == testpaths
        and not config.option.keyword
        and config.option.markexpr in ("", "not slow")
        and not getattr(config.option, "lf", False)
    )
