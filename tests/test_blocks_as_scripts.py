"""Every Python block as a reader runs it: the text the built page shows (what its copy button
copies), saved to a file and run with `python main.py` in a fresh process, in a directory laid out
like a checkout, against a fresh migrated database.

`tests/test_docs.py` runs the same blocks in the test process (pytest-examples), which is quicker
and keeps their `#>` lines up to date, but a block can pass there and not as a script: a fork that
inherits the test process's threads, a section of a module that leaves out an import the module
had. These tests are `slow` (a process per block and driver): `make test SLOW=1` and `.ci/run`.

Programs run under each driver their fence allows, with the environment `test_docs.py` gives
them (`needs="tls"`, `needs="pgbouncer"` …), and must exit 0 with their `#>` lines printed (the
comparison ignores line breaks and indentation, which pytest-examples adds to long output).
Blocks that show code from `src/` are parts of modules, not programs: `tests/test_includes.py`
checks that what a reader copies from them is whole where it should be.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pytest_examples import CodeExample

from dblayer.settings import DRIVERS, Driver
from tests.blocks import FenceSettings, lay_out_checkout, name, normalise
from tests.browser import build
from tests.databases import Server, skip_unless_the_server_can
from tests.localhost import require_ipv6_localhost
from tests.paths import DOCS, ROOT
from tests.test_docs import PYTHON_BLOCKS, _database

pytestmark = pytest.mark.slow

SCRIPT_TIMEOUT = 120  # seconds: a block that hangs as a script fails here, with its output
_OPENING = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


class _CodeBlocks(HTMLParser):
    """The text of every block of code on a built page (`div.highlight > pre > code`), in order;
    inline code is not in a `div.highlight`."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[str] = []
        self._in_highlight = 0  # depth of open divs since a div.highlight opened
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div":
            classes = (dict(attrs).get("class") or "").split()
            if self._in_highlight or "highlight" in classes:
                self._in_highlight += 1
        elif tag == "code" and self._in_highlight and self._text is None:
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "code" and self._text is not None:
            self.blocks.append("".join(self._text))
            self._text = None
        elif tag == "div" and self._in_highlight:
            self._in_highlight -= 1

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def fence_lines(page: Path) -> list[int]:
    """The line numbers (1-based) of the page's fences that render as a block of code (mermaid
    renders as a diagram), in order."""
    found: list[int] = []
    closing: re.Pattern[str] | None = None
    for number, line in enumerate(page.read_text("utf-8").splitlines(), start=1):
        if closing is not None:
            if closing.match(line):
                closing = None
            continue
        opening = _OPENING.match(line)
        if opening:
            fence = opening["fence"]
            closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            if not opening["info"].lstrip("{.").startswith("mermaid"):
                found.append(number)
    return found


def built_page(site: Path, page: Path) -> Path:
    relative = page.relative_to(DOCS).with_suffix("")
    return site / "index.html" if relative.name == "index" else site / relative / "index.html"


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = tmp_path_factory.mktemp("site")
    build(ROOT, built)
    return built


def shown(site: Path, block: CodeExample) -> str:
    """The block's text on the built page, as its copy button copies it."""
    parser = _CodeBlocks()
    parser.feed(built_page(site, block.path).read_text("utf-8"))
    lines = fence_lines(block.path)
    assert len(lines) == len(parser.blocks), (
        f"{block.path.name}: {len(lines)} fences of code, {len(parser.blocks)} blocks built"
    )
    return parser.blocks[lines.index(block.start_line)]


def _flat(text: str) -> str:
    """Printed text without what pytest-examples' wrapping of long output changes."""
    text = re.sub(r"\s+", "", normalise(text))
    return re.sub(r",(?=[)\]}])", "", text)


def expected_output(source: str) -> str:
    """What the block's output comments say it prints: its `#>` lines, and the triple-quoted
    strings pytest-examples writes after a print whose output is long."""
    expected: list[str] = []
    lines = iter(source.splitlines())
    previous = ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#>"):
            expected.append(stripped[3:] if stripped.startswith("#> ") else stripped[2:])
        elif stripped == '"""' and (previous.startswith("print(") or previous == ")"):
            for inside in lines:  # up to the closing quotes
                if inside.strip() == '"""':
                    break
                expected.append(inside)
            previous = '"""'
            continue
        if stripped:
            previous = stripped
    return "\n".join(expected)


def run_as_script(
    text: str, directory: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`python main.py` in `directory`, laid out like a checkout (alembic.ini beside src/)."""
    lay_out_checkout(directory)
    (directory / "main.py").write_text(text, "utf-8")
    process = subprocess.Popen(
        [sys.executable, "main.py"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its children too are stopped on a timeout
    )
    try:
        stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"did not finish in {SCRIPT_TIMEOUT} s as a script:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    ("block", "driver"),
    [
        pytest.param(block, driver, id=f"{name(block)}-{driver}")
        for block in PYTHON_BLOCKS
        for driver in DRIVERS
    ],
)
def test_block_as_a_script(
    block: CodeExample,
    driver: Driver,
    site: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    settings = FenceSettings.parse(block.prefix, name(block))
    if settings.skip or driver not in settings.drivers:
        pytest.skip(f"exempt: {settings.reason}")
    server: Server = request.getfixturevalue("server")
    skip_unless_the_server_can(settings.needs, server)
    if "ipv6-localhost" in settings.needs:
        require_ipv6_localhost()
    text = shown(site, block)
    environment, _ = _database(settings, driver, request, monkeypatch)
    directory = tmp_path / "checkout"
    directory.mkdir()
    result = run_as_script(text, directory, {**os.environ, **environment})
    assert result.returncode == 0, f"{name(block)} as a script:\n{result.stdout}\n{result.stderr}"
    expected = expected_output(text)
    assert _flat(expected) in _flat(result.stdout), (
        f"{name(block)} printed, as a script:\n{result.stdout}\nthe page shows:\n{expected}"
    )


def test_every_fence_of_code_is_a_block_of_the_built_pages(site: Path) -> None:
    """Guards the pairing of fences with built blocks that the tests above rely on."""
    pages = [p for p in DOCS.rglob("*.md") if not p.relative_to(DOCS).parts[0].startswith(".")]
    assert pages
    for page in sorted(pages):
        parser = _CodeBlocks()
        parser.feed(built_page(site, page).read_text("utf-8"))
        assert len(fence_lines(page)) == len(parser.blocks), page.name
