"""The README's table of pages, code and tests stays true as pages, modules and tests change."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.faults import plant
from tests.paths import ROOT

TABLE = "## Pages, code and tests"
_ROW = re.compile(r"^\| (.+?) \| (.+?) \| (.+?) \|$", re.M)
_INCLUDE = re.compile(r'--8<-- "(src/dblayer/[^":]+)')


def _paths(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def table_problems(root: Path = ROOT) -> list[str]:
    """What the README's table says that the checkout does not bear out, one line each."""
    readme = (root / "README.md").read_text("utf-8")
    if TABLE not in readme:
        return [f"README.md has no {TABLE!r} section"]
    section = readme.split(TABLE, 1)[1].split("\n## ", 1)[0]
    src, tests, docs = root / "src" / "dblayer", root / "tests", root / "docs"
    rows = [
        (_paths(page), _paths(code), _paths(tested))
        for page, code, tested in _ROW.findall(section)[1:]  # not the header
    ]
    problems = []
    listed_pages = [page for pages, _, _ in rows for page in pages]
    listed_code = [src / path for _, code, _ in rows for path in code]
    listed_tests = {path for _, _, tested in rows for path in tested}
    for page in sorted(docs.rglob("*.md")):
        if any(part.startswith(".") for part in page.relative_to(docs).parts):
            continue  # not a page: included into one (docs/.bench/, docs/.verified.md)
        name = page.relative_to(root).as_posix()
        if (count := listed_pages.count(name)) != 1:
            problems.append(f"{name} is listed {count} times")
    for path in dict.fromkeys([root / p for p in listed_pages] + listed_code):  # each once
        if not path.exists():
            problems.append(f"{path.relative_to(root)} does not exist")
    for name in sorted(listed_tests):
        if not (tests / name).is_file():
            problems.append(f"tests/{name} does not exist")
    for module in sorted(src.rglob("*.py")):
        if module.name != "__init__.py" and not _covered(module, listed_code):
            problems.append(f"{module.relative_to(root)} is in no row")
    for test in sorted(tests.glob("test_*.py")):
        if test.name not in listed_tests:
            problems.append(f"tests/{test.name} is in no row")
    for pages, code, _ in rows:
        for listed in pages:
            path = root / listed
            text = path.read_text("utf-8") if path.is_file() else ""
            for included in sorted(set(_INCLUDE.findall(text))):
                if not _covered(root / included, [src / p for p in code]):
                    problems.append(f"{listed} includes {included}, which its row does not list")
    return problems


def _covered(module: Path, listed: list[Path]) -> bool:
    """The module is listed, or a directory it is in."""
    return any(module == path or path in module.parents for path in listed)


def test_the_readme_table_is_true() -> None:
    assert table_problems() == []


def test_the_readme_table_check_catches_each_fault(tmp_path: Path) -> None:
    """A scratch checkout with a page, a module and a test module the table does not know, a row
    naming a file that is gone, and a page including code its row does not list."""
    root = tmp_path / "checkout"
    for part in ("src", "tests", "docs"):
        shutil.copytree(
            ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "vendor")
        )
    shutil.copy(ROOT / "README.md", root)
    (root / "docs" / "new-chapter.md").write_text("# New\n")
    (root / "src" / "dblayer" / "unlisted.py").write_text('"""Unlisted."""\n')
    (root / "tests" / "test_unlisted.py").write_text('"""Unlisted."""\n')
    (root / "src" / "dblayer" / "session.py").unlink()
    plant(
        root / "docs" / "sessions.md",
        "\n## ",
        '\n```python\n--8<-- "src/dblayer/pool.py:status"\n```\n\n## ',
    )
    assert table_problems(root) == [
        "docs/new-chapter.md is listed 0 times",
        "src/dblayer/session.py does not exist",
        "src/dblayer/unlisted.py is in no row",
        "tests/test_unlisted.py is in no row",
        "docs/sessions.md includes src/dblayer/pool.py, which its row does not list",
    ]
    assert table_problems() == []  # the real checkout was not touched
