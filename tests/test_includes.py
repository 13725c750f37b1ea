"""What a reader copies from a block that shows code from `src/` is whole where it should be.

A named section (`--8<-- "src/…/module.py:name"`) is a part of a module: the page shows the part
it talks about. But a section that is all of its module's code, less the imports, is a file that
a reader copies whole and finds broken (`NameError: name 'Connection' is not defined`, seen with
the migrations page's `env.py`): such a module is included whole. So are the files a reader puts
into a project as they are (Alembic's `env.py`, revision files).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.paths import DOCS, ROOT

_INCLUDE = re.compile(r'^\s*-+8<-+\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$', re.M)
WHOLE_FILES = re.compile(r"src/dblayer/migrations/(?:env\.py|versions/.+\.py)$")


def includes() -> list[tuple[str, str, str | None]]:
    """(page, path, section) for every include on the pages."""
    return [
        (page.name, match["path"], match["section"])
        for page in sorted(DOCS.glob("*.md"))
        for match in _INCLUDE.finditer(page.read_text("utf-8"))
    ]


def outside_section(path: Path, section: str) -> list[str]:
    """The module's top-level statements the section leaves out, but for its docstring and
    imports (and `from __future__`): what a reader would miss in a copy of the section alone."""
    source = path.read_text("utf-8")
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines, 1) if f"[start:{section}]" in line)
    end = next(i for i, line in enumerate(lines, 1) if f"[end:{section}]" in line)
    left_out = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if start < node.lineno and (node.end_lineno or node.lineno) < end:
            continue
        left_out.append(ast.get_source_segment(source, node) or "")
    return left_out


@pytest.mark.parametrize(
    ("page", "path", "section"),
    [i for i in includes() if i[1].endswith(".py") and i[2]],
    ids=lambda value: str(value),
)
def test_a_section_is_part_of_a_module(page: str, path: str, section: str) -> None:
    assert not WHOLE_FILES.search(path), f"{page}: include {path} whole (a reader copies it whole)"
    assert outside_section(ROOT / path, section), (
        f'{page}: "{path}:{section}" is all of the module but its imports: include the file whole'
    )


def test_the_rules_see_the_includes() -> None:
    """Guards the parsing: the pages include sections and whole files, env.py among the latter;
    and the check finds a section that is its whole module (the old env.py of this guide)."""
    found = includes()
    assert any(section for _, _, section in found)
    assert ("migrations.md", "src/dblayer/migrations/env.py", None) in found


def test_a_whole_module_section_is_found(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        '"""Doc."""\n\nimport os\n\n# --8<-- [start:all]\ndef f() -> str:\n'
        "    return os.sep\n# --8<-- [end:all]\n"
    )
    assert outside_section(module, "all") == []
    module.write_text(module.read_text() + "\nCONSTANT = 1\n")
    assert outside_section(module, "all") == ["CONSTANT = 1"]
