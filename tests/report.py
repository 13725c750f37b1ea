"""The run report, a pytest plugin (`pytest_plugins` in conftest.py): what the docs tests ran,
the summary line, and, after a complete green run, the record the site build shows (`verified`).

It reads the test reports, which xdist forwards from every worker to the controller, so the
controller (or the only process) holds the whole run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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

    def record(self) -> verified.Record | None:
        """What this run verified, if it ran every block of unchanged content (a run on a
        trusting server skips some, so it records nothing)."""
        if self.server is None or self.finished != expected_docs_tests():
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
        """A complete green run writes its record (`.cache/verified/pg<major>.json`)."""
        config = session.config
        if hasattr(config, "workerinput") or config.option.update_examples:
            return
        record = self.record() if exitstatus == 0 else None
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
    config.stash[REPORT] = run
    config.pluginmanager.register(run, "dblayer-report")
