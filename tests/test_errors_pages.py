"""The errors-by-message pages keep their promise to a reader who arrives with a message.

Each section of `docs/errors-*.md` is headed by the message(s) a reader searches for, in
backticks. `test_docs.py` checks that the blocks print what the page shows; this module checks
that what they print is the heading's message: every message of a heading appears in the checked
output (`#>` lines, pytest-examples' printed strings, console output) of a block of that section
that runs, and every driver runs a block there (the message, or the other driver's equivalent in
its tab). The index on `docs/errors.md` lists every section, and the message each row quotes
first is in the checked output of the section it links to, on an errors page or in another
chapter. The messages issue 19 asks for each head a section.
"""

from __future__ import annotations

import ast
import itertools
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from markdown.extensions.toc import slugify  # type: ignore[import-untyped]

from dblayer.settings import DRIVERS
from tests.blocks import FenceSettings
from tests.faults import plant
from tests.paths import DOCS

_HEADING = re.compile(r"^## (.+?)(?: \{ #([\w-]+) \})?$", re.M)
_CODE = re.compile(r"`([^`]+)`")
_FENCE = re.compile(r"(^ *```)( *)(.*?)\n(.+?)\1", flags=re.M | re.S)
_LINK = re.compile(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)")
_ROW = re.compile(r"^\| (.+?) \| (.+?) \| (.+?) \|$", re.M)
_ANY_HEADING = re.compile(r"^(#{2,4}) (.+?)(?: \{ #([\w-]+) \})?$", re.M)
_MAX_LINES = 450  # DESIGN.md: no page over ~450 rendered lines
# Issue 19's list, as the issue words them (`…` stands for anything):
_REQUIRED = (
    "greenlet_spawn has not been called",
    "another operation is in progress",
    "IllegalStateChangeError",
    "Task … got Future … attached to a different loop",
    "Event loop is closed",
    "QueuePool limit of size … reached",
    "connection was closed in the middle of operation",
    "connection is closed",
    'prepared statement "__asyncpg_stmt_…" already exists',
    "unexpected keyword argument 'sslmode'",
    "can't subtract offset-naive and offset-aware datetimes",
    "Object of type UUID is not JSON serializable",
    "asyncio.run() cannot be called from a running event loop",
    "password authentication failed",
    "database … does not exist",
    "relation … does not exist",
    "duplicate key value violates unique constraint",
    "canceling statement due to statement timeout",
    "could not serialize access",
    "deadlock detected",
    "Multiple exceptions: [Errno 111]",
)  # and asyncpg's DataError for a naive datetime into timestamptz, which is no message: neither
# driver raises; errors-data.md#asyncpg-datetime-dataerror runs the silent shift instead.


@dataclass(frozen=True)
class Block:
    drivers: tuple[str, ...]
    output: str  # what the page shows the block printed


@dataclass(frozen=True)
class Section:
    page: str  # errors-async.md
    anchor: str
    messages: tuple[str, ...]
    text: str  # the section's markdown, heading excluded

    @property
    def where(self) -> str:
        return f"{self.page}#{self.anchor}"

    def blocks(self) -> list[Block]:
        """The blocks that run (not `test="skip"`, not files that a console block runs)."""
        found = []
        for match in _FENCE.finditer(self.text):
            prefix = match.group(3).strip()
            language = prefix.strip("{}").split()[0].lstrip(".") if prefix else ""
            settings = FenceSettings.parse(prefix, self.where)
            if settings.skip or settings.file or language not in {"python", "console"}:
                continue
            body = textwrap.dedent(match.group(4))
            output = _python_output(body) if language == "python" else _console_output(body)
            found.append(Block(settings.drivers, output))
        return found


def _python_output(code: str) -> str:
    """`#>` lines, and the strings pytest-examples writes for long output: a string statement
    right after a `print(...)` statement (a docstring or any other string is no output)."""
    lines = [line.strip()[3:] for line in code.splitlines() if line.strip().startswith("#> ")]
    strings = []
    for node in ast.walk(ast.parse(code)):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            for before, after in itertools.pairwise(statements):
                if _is_print(before) and isinstance(after, ast.Expr):
                    value = after.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        strings.append(value.value)
    return "\n".join([*lines, *(textwrap.dedent(s).strip() for s in strings)])


def _is_print(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Call)
        and isinstance(statement.value.func, ast.Name)
        and statement.value.func.id == "print"
    )


def _console_output(body: str) -> str:
    return "\n".join(line for line in body.splitlines() if not line.startswith("$ "))


def shows(message: str, text: str) -> bool:
    """`message` in `text`, where `…` in the message stands for anything (a name, a number)."""
    parts = [re.escape(part) for part in message.split("…")]
    return re.search(".*?".join(parts), text, flags=re.S) is not None


def sections(docs: Path = DOCS) -> list[Section]:
    found = []
    for path in sorted(docs.glob("errors-*.md")):
        text = path.read_text("utf-8")
        headings = list(_HEADING.finditer(text))
        for heading, following in zip(headings, [*headings[1:], None], strict=True):
            end = following.start() if following else len(text)
            found.append(
                Section(
                    page=path.name,
                    anchor=heading.group(2) or "",
                    messages=tuple(_CODE.findall(heading.group(1))),
                    text=text[heading.end() : end],
                )
            )
    return found


def section_problems(section: Section) -> list[str]:
    """What the section promises in its heading and does not show, one line each."""
    where = section.where
    if not section.anchor:
        return [f"{where}: the heading has no {{ #id }} for the index to link to"]
    if not section.messages:
        return [f"{where}: the heading quotes no message in backticks"]
    blocks = section.blocks()
    problems = []
    for message in section.messages:
        if not any(shows(message, block.output) for block in blocks):
            problems.append(f"{where}: no block's checked output shows {message!r}")
    run = {driver for block in blocks for driver in block.drivers}
    if missing := set(DRIVERS) - run:
        problems.append(f"{where}: no block runs under {sorted(missing)}")
    prose = _FENCE.sub("", section.text)
    if not any(not page.startswith("errors") for page, _ in _LINK.findall(prose)):
        problems.append(f"{where}: links to no chapter with the fix")
    return problems


def chapter_section(docs: Path, page: str, anchor: str) -> Section | None:
    """The section of `page` an index row links to: from its heading (its `{ #id }`, or the id
    Python-Markdown's toc makes of its text) to the next heading of the same level or higher."""
    path = docs / page
    if not path.is_file():
        return None
    text = path.read_text("utf-8")
    headings = list(_ANY_HEADING.finditer(_FENCE.sub(_blank, text)))
    for number, heading in enumerate(headings):
        level, title, explicit = heading.group(1), heading.group(2), heading.group(3)
        if (explicit or slugify(_plain(title), "-")) != anchor:
            continue
        end = next(
            (h.start() for h in headings[number + 1 :] if len(h.group(1)) <= len(level)),
            len(text),
        )
        return Section(page, anchor, (), text[heading.end() : end])
    return None


def _blank(match: re.Match[str]) -> str:
    """A fence's text as spaces (a `# comment` in a block is no heading), offsets kept."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _plain(title: str) -> str:
    """A heading's text as the toc sees it: no backticks, links as their text."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")


def index_problems(docs: Path = DOCS) -> list[str]:
    """The index on errors.md: every section listed; the message a row quotes first is in the
    checked output of a block of the section it links to (an errors page's or another chapter's)."""
    by_link = {section.where: section for section in sections(docs)}
    index = (docs / "errors.md").read_text("utf-8")
    listed = set()
    problems = []
    for message_cell, _driver_cell, where_cell in _ROW.findall(index):
        quoted = _CODE.findall(message_cell)
        for page, anchor in _LINK.findall(where_cell):
            link = f"{page}#{anchor}"
            if page.startswith("errors-"):
                listed.add(link)
                section = by_link.get(link)
            else:
                section = chapter_section(docs, page, anchor)
            if section is None:
                problems.append(f"errors.md: {link} is no section")
            elif not quoted:
                problems.append(f"errors.md: the row for {link} quotes no message")
            elif not any(shows(quoted[0], block.output) for block in section.blocks()):
                problems.append(f"errors.md: {link} shows {quoted[0]!r} in no block's output")
    problems += [f"errors.md does not list {link}" for link in sorted(set(by_link) - listed)]
    return problems


def required_problems(docs: Path = DOCS) -> list[str]:
    """Issue 19's messages: each heads a section (its heading quotes it)."""
    headings = "\n".join(message for section in sections(docs) for message in section.messages)
    return [
        f"no heading quotes {message!r}" for message in _REQUIRED if not shows(message, headings)
    ]


def test_every_section_shows_its_message() -> None:
    found = sections()
    assert len(found) >= 20, "the parser found too few sections: is it broken?"
    assert [problem for section in found for problem in section_problems(section)] == []


def test_the_index_lists_every_section() -> None:
    assert index_problems() == []


def test_the_issue_s_messages_each_head_a_section() -> None:
    assert required_problems() == []


def test_the_pages_stay_short() -> None:
    pages = [DOCS / "errors.md", *sorted(DOCS.glob("errors-*.md"))]
    long = [p.name for p in pages if len(p.read_text("utf-8").splitlines()) > _MAX_LINES]
    assert long == []


def test_the_checks_catch_planted_faults(tmp_path: Path) -> None:
    """Each check fails on the fault it is there for, planted in a scratch copy."""
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    async_page, conflicts = docs / "errors-async.md", docs / "errors-concurrency.md"
    # A heading that promises a message its block does not print:
    plant(async_page, "## `RuntimeError: Event loop is closed`", "## `Event loop is open`")
    # A heading's message in a docstring, and no longer in the output:
    plant(conflicts, "#> ['40P01 deadlock detected', 'committed']", "#> ['40P01', 'committed']")
    plant(
        conflicts,
        "    def touch(",
        '    """Two rows locked in opposite orders: deadlock detected."""\n\n    def touch(',
    )
    # A heading's message in the prose only:
    plant(conflicts, "#> 57014 canceling statement due to statement timeout", "#> 57014")
    plant(
        conflicts,
        "The server cancelled a statement",
        "`canceling statement due to statement timeout`: the server cancelled a statement",
    )
    # A section the index forgets:
    index = docs / "errors.md"
    row = next(
        line for line in index.read_text("utf-8").splitlines() if "#deadlock-detected" in line
    )
    plant(index, row + "\n", "")
    # A row quoting words its section never has:
    plant(index, '| `relation "…" does not exist` |', "| `relation … is missing` |")
    # A row whose message its section has in the prose, in no output:
    plant(
        index, "| `canceling statement due to lock timeout` |", "| `could not obtain lock on row` |"
    )
    # A row linking to another chapter's section that does not show its message:
    plant(index, "| `Session is already flushing` |", "| `Session is already closed` |")
    problems = [p for section in sections(docs) for p in section_problems(section)]
    assert problems == [
        "errors-async.md#event-loop-closed: no block's checked output shows 'Event loop is open'",
        "errors-concurrency.md#statement-timeout: no block's checked output shows"
        " 'canceling statement due to statement timeout'",
        "errors-concurrency.md#deadlock-detected: no block's checked output shows"
        " 'deadlock detected'",
    ]
    assert index_problems(docs) == [
        "errors.md: sessions.md#one-session-per-task shows 'Session is already closed'"
        " in no block's output",
        "errors.md: errors-data.md#relation-does-not-exist shows 'relation … is missing'"
        " in no block's output",
        "errors.md: errors-concurrency.md#statement-timeout shows"
        " 'canceling statement due to statement timeout' in no block's output",
        "errors.md: errors-concurrency.md#lock-timeout shows 'could not obtain lock on row'"
        " in no block's output",
        "errors.md does not list errors-concurrency.md#deadlock-detected",
    ]
    assert required_problems(docs) == [
        "no heading quotes 'Event loop is closed'",
    ]


def test_a_section_without_both_drivers_or_a_link_is_caught() -> None:
    section = Section(
        page="errors-x.md",
        anchor="x",
        messages=("boom",),
        text='\n```{.python drivers="asyncpg" reason="r"}\nprint("boom")\n#> boom\n```\n',
    )
    assert section_problems(section) == [
        "errors-x.md#x: no block runs under ['psycopg']",
        "errors-x.md#x: links to no chapter with the fix",
    ]
    assert section_problems(Section("errors-x.md", "", (), "")) == [
        "errors-x.md#: the heading has no { #id } for the index to link to"
    ]
    assert section_problems(Section("errors-x.md", "x", (), "")) == [
        "errors-x.md#x: the heading quotes no message in backticks"
    ]
    assert shows("Task … got Future … attached", "Task <a> got Future <b> attached")
