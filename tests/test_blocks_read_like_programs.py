"""A program block reads like the reader's own program, not like a test (issue 19).

The harness gives every block its own fresh database and environment, so a block never needs to
change its environment, write a `.env` or other file where it runs, wipe tables, or borrow the
test suite's helpers. A block that did would teach the reader to do the same. Where a block
needs set-up, the harness does it, or the page says in a sentence what the reader would do.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pytest_examples import CodeExample

from tests.blocks import python_blocks, python_file_blocks
from tests.browser import TaglessLoader
from tests.paths import ROOT

# What a reader's program does not do, each with what to do instead.
PATTERNS: dict[str, tuple[re.Pattern[str], str]] = {
    "changes os.environ": (
        re.compile(
            r"os\.environ\s*\[[^\]]+\]\s*=|os\.environ\.(?:pop|update|setdefault|clear)\("
            r"|\bdel\s+os\.environ|os\.(?:putenv|unsetenv)\("
        ),
        "pass the value as an argument (get_settings(database_url=...)); the harness sets the "
        "environment a block runs in",
    ),
    "writes .env": (
        re.compile(r"""["']\.env["']"""),
        "show the file in a ```text block and say where it goes",
    ),
    "writes a file in the working directory": (
        re.compile(
            r"""\bPath\(\s*["'][^"'/]+["']\s*\)\.(?:write_text|write_bytes|touch|open)\("""
            r"""|\bopen\(\s*["'][^"'/]+["']\s*,\s*["'][wax]"""
        ),
        "a file of the reader's project is a file block (see tests/blocks.py FileBlock)",
    ),
    "wipes tables": (
        re.compile(r"\bTRUNCATE\b|\bDELETE\s+FROM\s+\w+\s*(?:[\"');]|$)|\.drop_all\b", re.I | re.M),
        "every block starts from its own fresh database: there is nothing to wipe",
    ),
    "forks or starts threads": (
        re.compile(r"\bos\.fork\(|\bthreading\.Thread\(|\bmultiprocessing\b"),
        "a reader's program gets a clean event loop from asyncio.run(main())",
    ),
    "uses the test suite": (
        re.compile(r"^\s*(?:from|import)\s+(?:tests|pytest|_pytest)\b|\bmonkeypatch\b", re.M),
        "a program block imports only what a reader's program would",
    ),
}

# (page, pattern) -> why that page's block may: the pattern is what the section demonstrates.
ALLOWED: dict[tuple[str, str], str] = {
    ("pooling-production.md", "forks or starts threads"): (
        "the section is about forked workers: the fork is the subject, not a way to a clean loop"
    ),
    ("production-roles.md", "wipes tables"): (
        "the app role is shown refused TRUNCATE and DELETE: nothing is wiped, that is the point"
    ),
}


def findings(blocks: list[CodeExample]) -> list[str]:
    """`page:line: what` for every pattern a block matches that the allow-list does not excuse."""
    found = []
    for block in blocks:
        for what, (pattern, _) in PATTERNS.items():
            if (block.path.name, what) in ALLOWED:
                continue
            for match in pattern.finditer(block.source):
                line = block.start_line + 1 + block.source.count("\n", 0, match.start())
                found.append(f"{block.path.name}:{line}: {what}")
    return found


def test_program_blocks_read_like_a_readers_program() -> None:
    programs, _ = python_blocks()
    found = findings(programs)
    advice = "; ".join(f"{what}: {instead}" for what, (_, instead) in PATTERNS.items())
    assert found == [], f"blocks that read like a test, not a program ({advice})"


def test_every_allowance_is_still_needed() -> None:
    """An allowance whose page no longer does it goes, so the list only holds reasons."""
    programs, _ = python_blocks()
    for page, what in ALLOWED:
        pattern = PATTERNS[what][0]
        assert any(
            block.path.name == page and pattern.search(block.source) for block in programs
        ), f"{page}: no block {what} any more; remove it from ALLOWED"


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ('os.environ["DATABASE_URL"] = "postgres://x"\n', "changes os.environ"),
        ('os.environ.pop("DATABASE_URL", None)\n', "changes os.environ"),
        ('Path(".env").write_text("A=1")\n', "writes .env"),
        ('Path("out.txt").write_text("x")\n', "writes a file in the working directory"),
        ('await conn.execute(text("TRUNCATE users"))\n', "wipes tables"),
        ('await conn.execute(text("DELETE FROM tasks"))\n', "wipes tables"),
        ("pid = os.fork()\n", "forks or starts threads"),
        ("from tests.databases import Databases\n", "uses the test suite"),
    ],
)
def test_the_scan_finds_each_pattern(source: str, what: str) -> None:
    assert PATTERNS[what][0].search(source)


def test_the_scan_leaves_a_readers_program_alone() -> None:
    program = (
        "import os\n"
        'url = os.environ["DATABASE_URL"]\n'
        'settings = get_settings(database_url=None, postgres_host="db.internal")\n'
        'await conn.execute(text("DELETE FROM tasks WHERE id = :id"), {"id": 1})\n'
    )
    assert [what for what, (p, _) in PATTERNS.items() if p.search(program)] == []


# The package's wrappers, and a program that does without them.
_WRAPPERS = re.compile(r"^\s*from dblayer\.(?:engine|session) import", re.M)
_PLAIN = re.compile(r"\bcreate_async_engine\(")
_PACKAGE = re.compile(r"^\s*(?:from|import)\s+dblayer\b", re.M)


def nav_chapters(mkdocs_yml: Path = ROOT / "mkdocs.yml") -> dict[str, list[str]]:
    """The nav's chapters: each top-level entry, title -> its page files (a section's pages at any
    depth, or the one page of a top-level entry)."""
    nav = yaml.load(mkdocs_yml.read_text("utf-8"), TaglessLoader)["nav"]  # noqa: S506

    def pages(target: object) -> list[str]:
        if isinstance(target, str):
            return [target]
        if isinstance(target, dict):
            return [page for value in target.values() for page in pages(value)]
        if isinstance(target, list):
            return [page for item in target for page in pages(item)]
        return []

    chapters: dict[str, list[str]] = {}
    for item in nav:
        title, target = next(iter(item.items())) if isinstance(item, dict) else (item, item)
        chapters[str(title)] = pages(target)
    return chapters


def test_every_chapter_shows_the_plain_sqlalchemy_call() -> None:
    """Issue 19: where a chapter's blocks call `dblayer`'s engine or session wrappers, one of its
    blocks does the same with SQLAlchemy alone (`create_async_engine`, no `dblayer` import), so a
    reader who does not take the package still has working code, checked like the rest."""
    programs, _ = python_blocks()
    by_page: dict[str, list[str]] = {}
    for block in [*programs, *python_file_blocks()]:  # a file= block is a program too
        by_page.setdefault(block.path.name, []).append(block.source)
    chapters = nav_chapters()
    assert {"Getting started", "PostgreSQL features"} <= set(chapters), "is the nav parser broken?"
    assert "postgres-notify-listener.md" in chapters["PostgreSQL features"]
    missing = []
    for title, pages in chapters.items():
        sources = [source for page in pages for source in by_page.get(page, [])]
        if any(_WRAPPERS.search(source) for source in sources) and not any(
            _PLAIN.search(source) and not _PACKAGE.search(source) for source in sources
        ):
            missing.append(title)
    assert missing == []
