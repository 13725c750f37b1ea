"""Every code block in docs/ runs against its own fresh database, under each driver.

Python blocks run as `__main__` (pytest-examples), are linted and format-checked with ruff, and
their `#>` output comments are compared with what they printed. Console blocks run in a shell and
their output is compared after `blocks.normalise`. `make update-examples` rewrites both.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from pytest_examples import CodeExample, EvalExample

from dblayer.models.diagram import er_diagram
from dblayer.pgbouncer import PgBouncer
from dblayer.settings import DRIVERS, Driver
from tests.blocks import (
    CONSOLE_UPDATES,
    READERS_PYTEST,
    ConsoleBlock,
    FenceSettings,
    find_console_blocks,
    lay_out_checkout,
    name,
    python_blocks,
    python_file_blocks,
    ruff_format,
    run_block,
)
from tests.databases import Databases, Server, skip_unless_the_server_can
from tests.localhost import require_ipv6_localhost
from tests.paths import DOCS, ROOT
from tests.replica import ReplicaDatabases
from tests.tls import TLSDatabases

RUFF_TOML = """\
line-length = 100
target-version = "py311"
[lint]
extend-select = ["I", "UP", "B"]
[lint.isort]
known-first-party = ["dblayer"]
"""
PYTHON_BLOCKS, INCLUDES = python_blocks()
PYTHON_FILES = python_file_blocks()
CONSOLE_BLOCKS = list(find_console_blocks())


def _params(blocks: list[CodeExample] | list[ConsoleBlock]) -> list[object]:
    """One test per block and driver; ids read `docs/engine.md:12-30-psycopg`.

    Under xdist the two may run at once on different workers, each in its own database: a block
    must not depend on anything outside its database (roles are cluster-wide: name them after it).
    """
    return [
        pytest.param(block, driver, id=f"{name(block)}-{driver}")
        for block in blocks
        for driver in DRIVERS
    ]


def _settings(
    block: CodeExample | ConsoleBlock, driver: Driver, request: pytest.FixtureRequest
) -> FenceSettings:
    """The fence's settings; an exempt run is recorded (for the summary) and skipped."""
    settings = FenceSettings.parse(block.prefix, name(block))
    record = {"block": name(block), "driver": driver, "kind": _kind(block), "exempt": ""}
    if settings.exempt:
        scope = "not run" if settings.skip else f"runs under {', '.join(settings.drivers)} only"
        record["exempt"] = f"{scope}: {settings.reason}"
    request.node.user_properties.append(("docs", record))  # read by conftest's report
    if settings.skip or driver not in settings.drivers:
        pytest.skip(f"exempt: {settings.reason}")
    server: Server = request.getfixturevalue("server")
    skip_unless_the_server_can(settings.needs, server)
    if "ipv6-localhost" in settings.needs:
        require_ipv6_localhost()
    return settings


def _database(
    settings: FenceSettings,
    driver: Driver,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[str, str], str]:
    """The block's own fresh database: the environment that names it (`DATABASE_URL`, and for
    `needs="tls"` the certificates, for `needs="replica"` the replica: see `FenceSettings`), and
    its server's admin URL."""
    if "tls" in settings.needs:
        tls: TLSDatabases = request.getfixturevalue("tls_databases")  # skips without OpenSSL
        home = request.getfixturevalue("tmp_path") / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))  # no ~/.postgresql of the developer's
        for variable in [v for v in os.environ if v.startswith("PGSSL")]:
            monkeypatch.delenv(variable)
        environment = tls.fresh(driver)
        request.addfinalizer(tls.drop)
        server = tls.databases.server
    elif "replica" in settings.needs:
        pair: ReplicaDatabases = request.getfixturevalue("replica_databases")
        database, environment = pair.fresh(driver)
        request.addfinalizer(lambda: pair.databases.drop(database))
        server = pair.databases.server
    else:
        databases: Databases = request.getfixturevalue("databases")
        name: str = request.getfixturevalue("fresh_database")
        url = databases.url(name, driver).render_as_string(hide_password=False)
        environment = {"DATABASE_URL": url}
        if "pgbouncer" in settings.needs:  # see FenceSettings; skips where it is not installed
            bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
            through = bouncer.url(databases.url(name, driver))
            environment = {
                "DATABASE_URL": through.render_as_string(hide_password=False),
                "MIGRATION_DATABASE_URL": url,
            }
        server = databases.server
    return environment, server.admin_url.render_as_string(hide_password=False)


def _kind(block: CodeExample | ConsoleBlock) -> str:
    return "console" if isinstance(block, ConsoleBlock) else "python"


def test_diagrams_have_no_html_line_breaks() -> None:
    """Seen in a browser: with mermaid2 and mermaid 12, `<br>` in a label is dropped and the words
    run together. Write shorter labels instead."""
    for page in sorted(DOCS.rglob("*.md")):
        for diagram in re.findall(r"```mermaid\n(.*?)```", page.read_text("utf-8"), flags=re.S):
            assert "<br" not in diagram, f"{page.name}: a mermaid label uses <br>"


# What only this harness prints: pytest-examples' module names (`pooling_536_567.py`), pytest's
# temporary directories and test names. A reader's run shows their own file and directory.
_HARNESS_TRACES = re.compile(
    r"\b[a-z-]+_\d+_\d+\.py\b|pytest-of-|/pytest-\d+/|\btest_(?:python|console)_block|popen-gw\d"
)


def test_no_page_shows_the_harness_files() -> None:
    """Printed output on a page (`#>` lines, console output, included tables) reads as the
    reader's own run would: `main.py`, their project's directory, never the harness's."""
    found = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in sorted(DOCS.rglob("*.md"))
        for number, line in enumerate(page.read_text("utf-8").splitlines(), start=1)
        if _HARNESS_TRACES.search(line)
    ]
    assert found == []


def test_the_er_diagram_matches_the_models(request: pytest.FixtureRequest) -> None:
    """The ORM page's diagram is what `python -m dblayer.models.diagram` renders now."""
    page = DOCS / "orm.md"
    text = page.read_text("utf-8")
    match = re.search(r"```mermaid\n(erDiagram\n.*?)```", text, flags=re.S)
    assert match, "docs/orm.md has no erDiagram block"
    rendered = er_diagram()
    if match.group(1) != rendered and request.config.getoption("update_examples"):
        page.write_text(text[: match.start(1)] + rendered + text[match.end(1) :], "utf-8")
        return
    assert match.group(1) == rendered, "the models changed: run `make update-examples`"


def test_the_pages_have_blocks() -> None:
    """Guards the harness itself: a broken finder would otherwise pass by running nothing."""
    assert len(PYTHON_BLOCKS) >= 5
    assert CONSOLE_BLOCKS
    assert INCLUDES
    assert PYTHON_FILES  # the testing page's files (run by its consoles)
    assert any(block.files for block in CONSOLE_BLOCKS)


@pytest.mark.parametrize(("example", "driver"), _params(PYTHON_BLOCKS))
def test_python_block(
    example: CodeExample,
    driver: Driver,
    eval_example: EvalExample,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings(example, driver, request)
    primary = settings.drivers[0]  # lints and updates the page
    for variable, value in _database(settings, driver, request, monkeypatch)[0].items():
        monkeypatch.setenv(variable, value)
    update = eval_example.update_examples
    _configure(eval_example)
    if driver == primary:  # lint once per block
        _lint(example, eval_example)
    mode: Literal["check", "update"] | None = "check"
    if update:  # the page is rewritten at the end of the run, from the primary driver's output
        mode = "update" if driver == primary else None
    with _interrupts_stop_the_run(), _warnings_as_a_script_sees_them():
        run_block(eval_example, example, {"__name__": "__main__"}, mode)


def _configure(eval_example: EvalExample) -> None:
    """Line length and target as a reader's project has them: pytest-examples wraps printed
    output at this length too, so every driver's run needs it, not only the linting one."""
    eval_example.set_config(
        line_length=100,
        target_version="py311",  # type: ignore[arg-type]  # its Literal lists py310 twice
        ruff_ignore=["T201"],
    )


def _lint(example: CodeExample, eval_example: EvalExample) -> None:
    """ruff check and ruff format, as a reader's project would configure them (imports sorted
    with dblayer first-party); `make update-examples` applies the fixes."""
    # ruff reads its configuration from the working directory (this test's own).
    Path("ruff.toml").write_text(RUFF_TOML)
    if eval_example.update_examples:
        eval_example.format_ruff(example)  # `ruff check --fix`
    else:
        eval_example.lint_ruff(example)
    ruff_format(example, eval_example, eval_example.update_examples)


@pytest.mark.parametrize("example", PYTHON_FILES, ids=name)
def test_python_file_block(example: CodeExample, eval_example: EvalExample) -> None:
    """A file of the reader's project on a page (`file="…"`): linted here, run by the console
    blocks after it."""
    _configure(eval_example)
    _lint(example, eval_example)


@contextlib.contextmanager
def _warnings_as_a_script_sees_them() -> Iterator[None]:
    """A block is the reader's script: a warning is printed (here, to the captured stderr), not
    raised as this suite's `filterwarnings = error` would. ResourceWarning stays an error: a
    leaked connection is a defect even where Python would not show it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", ResourceWarning)
        yield
    for warning in caught:
        print(
            warnings.formatwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            ),
            end="",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _interrupts_stop_the_run() -> Iterator[None]:
    """pytest-examples turns Ctrl-C inside a block into a print; make it end the run again, so
    the embedded server is stopped as after any Ctrl-C."""
    interrupted: list[int] = []

    def handler(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception:
        if not interrupted:
            raise  # the block's own failure
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if interrupted:
        raise KeyboardInterrupt(f"signal {interrupted[0]} while a block ran")


@pytest.mark.parametrize(("block", "driver"), _params(CONSOLE_BLOCKS))
def test_console_block(
    block: ConsoleBlock,
    driver: Driver,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    settings = _settings(block, driver, request)
    primary = settings.drivers[0]
    database, server = _database(settings, driver, request, monkeypatch)
    env = {
        **os.environ,
        **database,
        # A reader's own tests (dblayer.testing) make their databases on this run's server (under
        # DATABASE_URL's driver); without it they would start an embedded server of their own.
        "TEST_DATABASE_URL": server,
        # pytest on a page runs as in a reader's project, without the plugins only this suite
        # installs (they print nothing there, but loading them takes a second and a half).
        "PYTEST_ADDOPTS": READERS_PYTEST,
        # the virtualenv's `python`, `alembic`, ... first, as after `source .venv/bin/activate`
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "100",
        "NO_COLOR": "1",
    }
    lay_out_checkout(tmp_path)
    block.write_files(tmp_path)  # the files the page showed before this block (`file="…"`)
    outputs = block.run(env, tmp_path, check=not request.config.getoption("update_examples"))
    if request.config.getoption("update_examples") and driver == primary:
        _rewrite_console_block(block, outputs)


def _rewrite_console_block(block: ConsoleBlock, outputs: list[str]) -> None:
    """Queue the new body; `pytest_sessionfinish` writes it after pytest-examples has written."""
    ordinal = [b.start_line for b in CONSOLE_BLOCKS if b.path == block.path].index(block.start_line)
    CONSOLE_UPDATES[(block.path, ordinal)] = block.render(outputs)
