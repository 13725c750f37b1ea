"""The errors-by-message pages keep their promise to a reader who arrives with a message.

Each section of `docs/errors-*.md` is headed by the message(s) a reader searches for, in
backticks. `test_docs.py` checks that the blocks print what the page shows; this module checks
that what they print is the heading's message: every message of a heading appears in the checked
output (`#>` lines, pytest-examples' printed strings, console output) of a block of that section
that runs, and every driver runs a block there (the message, or the other driver's equivalent in
its tab). The index on `docs/errors.md` lists every section, and its rows that lead to a section
quote words that section has.
"""

from __future__ import annotations

import ast
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from dblayer.settings import DRIVERS
from tests.blocks import FenceSettings
from tests.faults import plant
from tests.paths import DOCS

_HEADING = re.compile(r"^## (.+?)(?: \{ #([\w-]+) \})?$", re.M)
_CODE = re.compile(r"`([^`]+)`")
_FENCE = re.compile(r"(^ *```)( *)(.*?)\n(.+?)\1", flags=re.M | re.S)
_LINK = re.compile(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)")
_ROW = re.compile(r"^\| (.+?) \| (.+?) \| (.+?) \|$", re.M)
_MAX_LINES = 450  # DESIGN.md: no page over ~450 rendered lines


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
    """`#>` lines, and the strings pytest-examples writes after a print for long output."""
    lines = [line.strip()[3:] for line in code.splitlines() if line.strip().startswith("#> ")]
    strings = [
        node.value.value
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    return "\n".join([*lines, *(textwrap.dedent(s).strip() for s in strings)])


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


def index_problems(docs: Path = DOCS) -> list[str]:
    """The index on errors.md: every section listed; every row that leads to a section quotes
    a message the section has (in its heading, prose or output)."""
    by_link = {section.where: section for section in sections(docs)}
    index = (docs / "errors.md").read_text("utf-8")
    listed = set()
    problems = []
    for message_cell, _, where_cell in _ROW.findall(index):
        for page, anchor in _LINK.findall(where_cell):
            if not page.startswith("errors-"):
                continue
            link = f"{page}#{anchor}"
            listed.add(link)
            section = by_link.get(link)
            quoted = _CODE.findall(message_cell)
            if section is None:
                problems.append(f"errors.md: {link} is no section")
            elif quoted and not shows(quoted[0], section.text):
                problems.append(f"errors.md: {link} never mentions {quoted[0]!r}")
    problems += [f"errors.md does not list {link}" for link in sorted(set(by_link) - listed)]
    return problems


def test_every_section_shows_its_message() -> None:
    found = sections()
    assert len(found) >= 20, "the parser found too few sections: is it broken?"
    assert [problem for section in found for problem in section_problems(section)] == []


def test_the_index_lists_every_section() -> None:
    assert index_problems() == []


def test_the_pages_stay_short() -> None:
    pages = [DOCS / "errors.md", *sorted(DOCS.glob("errors-*.md"))]
    long = [p.name for p in pages if len(p.read_text("utf-8").splitlines()) > _MAX_LINES]
    assert long == []


def test_the_checks_catch_planted_faults(tmp_path: Path) -> None:
    """Each check fails on the fault it is there for, planted in a scratch copy."""
    for page in DOCS.glob("errors*.md"):
        shutil.copy(page, tmp_path)
    async_page = tmp_path / "errors-async.md"
    # A heading that promises a message its block does not print:
    plant(async_page, "## `RuntimeError: Event loop is closed`", "## `Event loop is open`")
    # A section the index forgets:
    index = tmp_path / "errors.md"
    row = next(
        line for line in index.read_text("utf-8").splitlines() if "#deadlock-detected" in line
    )
    plant(index, row + "\n", "")
    # A row quoting words its section never has:
    plant(index, '| `relation "…" does not exist` |', "| `relation … is missing` |")
    problems = [p for section in sections(tmp_path) for p in section_problems(section)]
    assert problems == [
        "errors-async.md#event-loop-closed: no block's checked output shows 'Event loop is open'"
    ]
    assert index_problems(tmp_path) == [
        "errors.md: errors-data.md#relation-does-not-exist never mentions 'relation … is missing'",
        "errors.md does not list errors-data.md#deadlock-detected",
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
