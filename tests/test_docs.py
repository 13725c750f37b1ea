"""Every code block in docs/ runs against its own fresh database, under each driver.

Python blocks run as `__main__` (pytest-examples), are linted and format-checked with ruff, and
their `#>` output comments are compared with what they printed. Console blocks run in a shell and
their output is compared after `blocks.normalise`. `make update-examples` rewrites both.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples
from pytest_examples.run_code import InsertPrintStatements

from dblayer.settings import DRIVERS, Driver
from tests.blocks import (
    CONSOLE_UPDATES,
    DOCS,
    ConsoleBlock,
    FenceSettings,
    find_console_blocks,
    missing_includes,
    normalise,
)
from tests.conftest import Report
from tests.databases import Databases

ROOT = DOCS.parent
SNIPPET = re.compile(r'^\s*--8<-- "[^"]+"\s*$')
_ALL_PYTHON = sorted(find_examples(DOCS), key=str)
# A block made only of `--8<--` lines shows code from src/: mkdocs --strict checks the include, and
# the module's own tests run the code.
INCLUDES = [b for b in _ALL_PYTHON if all(SNIPPET.match(x) for x in b.source.strip().splitlines())]
PYTHON_BLOCKS = [b for b in _ALL_PYTHON if b not in INCLUDES]
CONSOLE_BLOCKS = list(find_console_blocks())


def _params(blocks: list[CodeExample] | list[ConsoleBlock]) -> list[object]:
    """One test per block and driver; ids read `docs/engine.md:12-30-psycopg`."""
    return [
        pytest.param(block, driver, id=f"{block}-{driver}")
        for block in blocks
        for driver in DRIVERS
    ]


def _settings(block: CodeExample | ConsoleBlock, driver: Driver, report: Report) -> FenceSettings:
    settings = FenceSettings.parse(block.prefix, str(block))
    if settings.exempt:
        scope = "not run" if settings.skip else f"runs under {', '.join(settings.drivers)} only"
        report.exemptions[str(block)] = f"{scope}: {settings.reason}"
    if settings.skip or driver not in settings.drivers:
        report.finished += 1
        pytest.skip(f"exempt: {settings.reason}")
    return settings


@pytest.fixture(scope="module", autouse=True)
def _count_all_docs_tests(report: Report) -> None:
    report.total = len(DRIVERS) * (len(PYTHON_BLOCKS) + len(CONSOLE_BLOCKS))


def test_every_include_resolves() -> None:
    assert missing_includes() == []


def test_the_pages_have_blocks() -> None:
    """Guards the harness itself: a broken finder would otherwise pass by running nothing."""
    assert len(PYTHON_BLOCKS) >= 5
    assert CONSOLE_BLOCKS
    assert INCLUDES


@pytest.mark.parametrize(("example", "driver"), _params(PYTHON_BLOCKS))
def test_python_block(
    example: CodeExample,
    driver: Driver,
    eval_example: EvalExample,
    databases: Databases,
    fresh_database: str,
    report: Report,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    primary = _settings(example, driver, report).drivers[0]  # lints and updates the page
    url = databases.url(fresh_database, driver).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    eval_example.set_config(
        line_length=100,
        target_version="py311",  # type: ignore[arg-type]  # its Literal lists py310 twice
        ruff_ignore=["T201"],
    )
    update = eval_example.update_examples
    if driver == primary:  # lint once per block
        if update:
            eval_example.format_ruff(example)  # `ruff check --fix`
        else:
            eval_example.lint_ruff(example)
        _ruff_format(example, eval_example, update)
    module: dict[str, object] = {"__name__": "__main__"}
    with _interrupts_stop_the_run():
        _run_block(eval_example, example, module, update, driver == primary)
    report.blocks[driver] += 1
    report.finished += 1


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


def _run_block(
    eval_example: EvalExample,
    example: CodeExample,
    module: dict[str, object],
    update: bool,
    primary: bool,
) -> None:
    if update and primary:
        eval_example.run_print_update(example, module_globals=module)
    elif update:  # the page is rewritten at the end of the run: nothing to compare with yet
        eval_example.run(example, module_globals=module)
    else:
        _run_print_check_normalised(eval_example, example, module)


def _ruff_format(example: CodeExample, eval_example: EvalExample, update: bool) -> None:
    """`ruff format` the block; `#>` lines are protected as pytest-examples does for black."""
    protected = re.sub(r"^( *#)> ", r"\1 > ", example.source, flags=re.M)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--line-length=100", "-"],
        input=protected,
        capture_output=True,
        text=True,
        check=True,
    )
    formatted = re.sub(r"^( *#) > ", r"\1> ", result.stdout, flags=re.M)
    if formatted == example.source:
        return
    if not update:
        diff = "".join(
            difflib.unified_diff(
                example.source.splitlines(True), formatted.splitlines(True), "page", "ruff format"
            )
        )
        pytest.fail(f"{example} is not ruff-formatted (make update-examples):\n{diff}")
    example.source = formatted
    eval_example._mark_for_update(example)


def _run_print_check_normalised(
    eval_example: EvalExample, example: CodeExample, module: dict[str, object]
) -> None:
    """Like `run_print_check`, but versions and durations may differ (see `blocks.normalise`)."""
    example.test_id = eval_example._test_id
    printed: InsertPrintStatements
    printed, _ = eval_example._run(example, "check", module, True, None)
    expected = example.source
    actual = printed.updated_print_statements(example) or expected
    if normalise(actual).rstrip() != normalise(expected).rstrip():
        printed.check_print_statements(example)  # fails with pytest-examples' own diff


@pytest.mark.parametrize(("block", "driver"), _params(CONSOLE_BLOCKS))
def test_console_block(
    block: ConsoleBlock,
    driver: Driver,
    databases: Databases,
    fresh_database: str,
    report: Report,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    primary = _settings(block, driver, report).drivers[0]
    env = {
        **os.environ,
        "DATABASE_URL": databases.url(fresh_database, driver).render_as_string(hide_password=False),
        # the virtualenv's `python`, `alembic`, ... first, as after `source .venv/bin/activate`
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "100",
        "NO_COLOR": "1",
    }
    outputs = []
    for command in block.commands:
        result = subprocess.run(
            ["bash", "-c", command.line],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = (result.stdout + result.stderr).rstrip()
        outputs.append(output)
        if request.config.getoption("update_examples"):
            continue
        assert normalise(output) == normalise(command.expected), (
            f"{block}: `{command.line}` printed (exit {result.returncode}):\n{output}\n"
            f"the page shows:\n{command.expected}"
        )
    if request.config.getoption("update_examples") and driver == primary:
        _rewrite_console_block(block, outputs)
    report.consoles[driver] += 1
    report.finished += 1


def _rewrite_console_block(block: ConsoleBlock, outputs: list[str]) -> None:
    """Queue the new body; `pytest_sessionfinish` writes it after pytest-examples has written."""
    ordinal = [b.start_line for b in CONSOLE_BLOCKS if b.path == block.path].index(block.start_line)
    CONSOLE_UPDATES[(block.path, ordinal)] = block.render(outputs)
