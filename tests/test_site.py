"""The site as readers see it: built strictly (MkDocs checks every link and anchor), then every
page in headless Chromium, offline (see `tests/browser.py`); the checks shown to fail on faults
planted in a scratch copy; the badge the run writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import markdown  # type: ignore[import-untyped]
import pytest
import yaml
from playwright.sync_api import Playwright, sync_playwright

from tests.browser import (
    ARTIFACTS,
    MERMAID_JS,
    PALETTES,
    BuildError,
    TaglessLoader,
    build,
    chapters,
    check_site,
    chromium,
    contrast,
    copy_checkout,
    pages,
    source,
)
from tests.faults import plant
from tests.paths import DOCS, ROOT
from tests.repository import UNKNOWN, clone_command, replace_marker

LONGEST_FIRST = True  # conftest.py starts these tests before the others
# More time than other tests get, and the thread method: once (the first run after installing
# Chromium) the 120 s signal-method timeout fired inside Playwright's message loop, whose
# exception went nowhere; the loop spun at 100% CPU and the run never ended. The thread method
# dumps the stacks and ends the worker, so xdist reports the test failed.
BROWSER_TIMEOUT = pytest.mark.timeout(600, method="thread")


def _unavailable(reason: str) -> None:
    """Skip where the machine lacks what the browser test needs; CI sets REQUIRE_BROWSER_TEST."""
    if os.environ.get("REQUIRE_BROWSER_TEST"):
        pytest.fail(f"REQUIRE_BROWSER_TEST is set, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = chromium()
    if path is None:
        _unavailable(
            "no Chromium: the browser test needs one (apt-get install chromium, or set CHROMIUM)"
        )
    if not (DOCS / MERMAID_JS).is_file():
        _unavailable(
            f"docs/{MERMAID_JS} is missing: `make test` fetches it with npm, without which "
            "the site cannot draw its diagrams offline"
        )
    assert path is not None
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.mark.slow
@BROWSER_TIMEOUT
def test_every_page_in_a_browser(browser_path: str, playwright: Playwright, tmp_path: Path) -> None:
    """Build the site strictly, open every page in Chromium with no network, and find nothing a
    reader would trip over (see `check_site`). Screenshots go to test-artifacts/screenshots/."""
    site = tmp_path / "site"
    build(ROOT, site)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    report = check_site(
        playwright, browser_path, site, DOCS, ROOT / "mkdocs.yml", screenshots=ARTIFACTS
    )
    assert report.problems == [], "\n".join(report.problems)
    # It looked at everything: every page, every chapter, every diagram in both palettes.
    built = [page.url for page in pages(site, DOCS)]
    assert report.visited == built
    assert set(chapters(ROOT / "mkdocs.yml")) <= set(built)
    diagrams = sum(p.source.read_text("utf-8").count("```mermaid") for p in pages(site, DOCS))
    assert diagrams > 0
    assert report.diagrams == {theme: diagrams for theme in PALETTES.values()}
    assert report.texts_checked > 0
    assert report.left_the_machine == []
    assert 'src="assets/verified.svg"' in (site / "index.html").read_text()  # the run's badge
    shots = {p.relative_to(ARTIFACTS).as_posix() for p in ARTIFACTS.rglob("*.png")}
    assert {f"light/{page.slug}.png" for page in pages(site, DOCS)} <= shots
    assert report.copy_checked
    (ARTIFACTS / "report.json").write_text(
        json.dumps({"pages": report.visited, "seconds": round(report.seconds, 1)}, indent=2)
    )


@pytest.mark.slow
@BROWSER_TIMEOUT
def test_planted_faults_are_caught(
    browser_path: str, playwright: Playwright, tmp_path: Path
) -> None:
    """Faults planted in a scratch copy of the checkout: the strict build rejects each link to a
    missing page or anchor; the browser finds each fault the build lets through."""
    checkout = copy_checkout(tmp_path / "checkout")
    docs = checkout / "docs"
    nav = chapters(checkout / "mkdocs.yml")
    sources = {url: source(docs, url) for url in nav}
    texts = {u: s.read_text("utf-8") for u, s in sources.items()}
    tabbed = next(u for u, text in texts.items() if '=== "psycopg"' in text)
    # A page with a diagram, the one with driver tabs if it has one: fewer pages to open.
    url = next(u for u in [tabbed, *texts] if "```mermaid\n" in texts[u])
    page = sources[url]
    other_url = next(u for u in sources if u not in (url, tabbed))
    other = sources[other_url]
    # Material without copy buttons and tabs, a chapter left out of the search index.
    plant(checkout / "mkdocs.yml", "    - content.code.copy\n", "")
    plant(checkout / "mkdocs.yml", "  - pymdownx.tabbed:\n      alternate_style: true\n", "")
    other.write_text("---\nsearch:\n  exclude: true\n---\n\n" + other.read_text("utf-8"), "utf-8")
    # mermaid's stock dark theme, whose edge labels and notes are under WCAG AA's contrast.
    plant(
        checkout / "docs" / "assets" / "javascripts" / "diagrams.js",
        "dark: { edgeLabelBackground",
        "dark: {}, unused: { edgeLabelBackground",
    )
    plant(
        page,
        "```mermaid\n",
        "```mermaid\nflowchart LR\n    A -->|unclosed label B\n```\n\n```mermaid\n",
    )
    plant(
        page,
        "\n## ",
        "\n[Gone](no-such-page.md), [a section that is not there]"
        f"({os.path.relpath(other, page.parent)}#no-such-section), [here](#nowhere).\n\n"
        '<img src="https://cdn.invalid/tracker.png" alt="from elsewhere">\n\n'
        "```mermaid\nflowchart LR\n    pale[pale on pale]\n"
        "    style pale fill:#ffffff,stroke:#999999,color:#f4f4f4\n```\n\n## ",
    )
    site = tmp_path / "site"
    with pytest.raises(BuildError) as failed:
        build(checkout, site)
    rejected = {
        "link to a missing page": r"'no-such-page\.md', but the target is not found",
        "link to a missing anchor": r"does not contain an anchor '#no-such-section'",
        "link to a missing anchor on the page": r"'#nowhere', but there is no such anchor",
        "strict": r"Aborted with 3 warnings in strict mode",
    }
    assert [f for f, e in rejected.items() if not re.search(e, str(failed.value))] == [], str(
        failed.value
    )
    # mkdocs writes every page before it reports what strict mode rejects: check them as built.
    assert (site / url / "index.html").is_file(), "mkdocs no longer writes pages before aborting"
    report = check_site(
        playwright, browser_path, site, docs, checkout / "mkdocs.yml", only=list({url, tabbed})
    )
    expected = {
        "diagram syntax": rf"console: mermaid diagram \d of /{url}: Parse error",
        "diagram not drawn": r"\d+ mermaid blocks, drawn: \[.*'failed'",
        "illegible in light": r"diagram \d \(default\): 'pale on pale' in rgb\(244, 244, 244\)",
        "illegible in dark": r"diagram \d \(slate\): 'pale on pale' in rgb\(244, 244, 244\)",
        "stock dark theme": r"diagram \d \(slate\): '(?!pale on pale)[^']+' in rgb.*contrast 4\.",
        "request off the machine": r"^a request tried to leave the machine: https://cdn\.invalid/",
        "image not loaded": r"the image https://cdn\.invalid/tracker\.png did not load",
        "no copy buttons": r": 0 copy buttons for [1-9]\d* blocks of code$",
        "no tabs": rf"^{tabbed}: tabs \[\], the markdown has \[.*'psycopg'",
        "chapter not indexed": rf"^search: the chapter '{nav[other_url]}' .* is not indexed",
    }
    problems = "\n".join(report.problems)
    missed = [
        fault for fault, pattern in expected.items() if not re.search(pattern, problems, re.M)
    ]
    assert missed == [], f"not reported: {missed}; reported:\n{problems}"
    unexplained = [
        p for p in report.problems if not any(re.search(e, p) for e in expected.values())
    ]
    assert all("console: Failed to load resource" in p for p in unexplained), unexplained


def test_a_missing_include_fails_the_build(tmp_path: Path) -> None:
    """pymdownx.snippets' `check_paths`: an included file or named section that is not there
    stops the strict build, naming it."""
    checkout = copy_checkout(tmp_path / "checkout")
    page = checkout / "docs" / "sessions.md"
    original = page.read_text("utf-8")
    for include, message in [
        ("src/dblayer/session.py:no-such-section", "section 'no-such-section' could not be"),
        ("src/dblayer/no_such_module.py", "'src/dblayer/no_such_module.py' could not be found"),
    ]:
        page.write_text(f'{original}\n```python\n--8<-- "{include}"\n```\n', "utf-8")
        with pytest.raises(BuildError, match=message):
            build(checkout, tmp_path / "site")


_RAW_LINK = re.compile(r"<a\s[^>]*\bhref=[^>]*>", re.I)


def raw_links(docs: Path) -> list[str]:
    """Links written as HTML in the pages: MkDocs validates markdown links only."""
    return [
        f"{page.relative_to(docs)}:{number}: {found.group()}"
        for page in sorted(docs.rglob("*.md"))
        for number, line in enumerate(page.read_text("utf-8").splitlines(), start=1)
        for found in _RAW_LINK.finditer(line)
    ]


def test_every_link_is_markdown_so_mkdocs_checks_it(tmp_path: Path) -> None:
    assert raw_links(DOCS) == []
    (tmp_path / "page.md").write_text('Intro.\n\nSee <a class="x" href="../gone/">this</a>.\n')
    assert raw_links(tmp_path) == ['page.md:3: <a class="x" href="../gone/">']


def test_contrast() -> None:
    assert contrast((0, 0, 0), (255, 255, 255)) == pytest.approx(21)
    assert contrast((119, 119, 119), (119, 119, 119)) == 1
    assert contrast((255, 255, 255), (118, 118, 118)) == pytest.approx(4.54, abs=0.01)


def test_pages_and_chapters_come_from_the_site_and_nav(tmp_path: Path) -> None:
    nav = chapters(ROOT / "mkdocs.yml")
    assert next(iter(nav)) == ""
    assert all(url == "" or url.endswith("/") for url in nav)
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "index.html").write_text("<html></html>")
    with pytest.raises(FileNotFoundError, match="orphan/"):
        pages(tmp_path, DOCS)


def test_mermaid_version_is_pinned_once() -> None:
    """The Makefile's npm version and mkdocs.yml's fallback URL name the same mermaid."""
    makefile = re.search(r"^MERMAID_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile
    assert f"mermaid@{makefile.group(1)}/" in (ROOT / "mkdocs.yml").read_text()


CLONE_PAGES = ("index.md", "getting-started.md")  # the pages that say how to get the code


def test_the_site_links_to_its_repository(tmp_path: Path) -> None:
    """Built with REPO_URL (as CI builds it), the header links to the repository and both pages
    show the real `git clone`; the pages' source holds the hook's marker, no placeholder."""
    for name in CLONE_PAGES:
        text = (DOCS / name).read_text("utf-8")
        assert "<!-- git clone -->" in text, name
        assert not re.search(r"git clone\s*<", text), name
    site = tmp_path / "site"
    build(ROOT, site, REPO_URL="https://github.com/example/guide", REPO_NAME="example/guide")
    for name in CLONE_PAGES:
        html = (site / name.replace(".md", "/index.html").replace("index/", "")).read_text()
        header = [a for a in re.findall(r"<a\s[^>]*>", html) if 'class="md-source"' in a]
        assert header, name
        assert all('href="https://github.com/example/guide"' in a for a in header), header
        code = re.sub(r"<[^>]+>", "", html).replace("&amp;", "&")
        assert "git clone https://github.com/example/guide.git && cd guide" in code, name


def test_without_repo_url_the_pages_say_so_rather_than_guess() -> None:
    assert replace_marker("a\n<!-- git clone -->\nb", None) == f"a\n{UNKNOWN}\nb"
    assert replace_marker("    <!-- git clone -->", "https://h/o/r/") == (
        "    ```bash\n    git clone https://h/o/r.git && cd r\n    ```"
    )
    assert clone_command("https://h/o/r.git") == "git clone https://h/o/r.git && cd r"


_ROW_LINK = re.compile(r"^\| \[[^\]]+\]\(([^)#]+\.md)\)", re.M)


def chapter_rows(index: str) -> list[str]:
    """The pages the index's chapter table links to, in its order (the first link of each row)."""
    return _ROW_LINK.findall(index)


def test_the_index_lists_the_chapters_in_the_order_of_the_navigation() -> None:
    """A reader who follows the index's table meets the chapters in the order of the sidebar."""
    nav = [
        ("index" if url == "" else url.rstrip("/")) + ".md" for url in chapters(ROOT / "mkdocs.yml")
    ]
    rows = chapter_rows((DOCS / "index.md").read_text("utf-8"))
    assert rows == [page for page in nav if page != "index.md"], (
        "docs/index.md's chapter table and mkdocs.yml's nav differ: give the table one row per "
        "nav page, in the nav's order"
    )
    assert chapter_rows("| [B](b.md) | x |\n| [A](a.md#s) | y |\n") == ["b.md"]


# A page a reader can hold in mind: at most this many lines of markdown once its `--8<--`
# includes are expanded (the code the reader scrolls past counts). A longer page answers more than
# one question: split it where the question changes (issue 19).
MAX_RENDERED_LINES = 450
# Pages still over the limit, each to be split; the test fails once one is short enough, so the
# list only shrinks.
NOT_YET_SPLIT: dict[str, str] = {}


def rendered_lines(page: Path) -> int:
    """The page's markdown with its includes expanded, as mkdocs.yml's pymdownx.snippets does."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text("utf-8"), TaglessLoader)  # noqa: S506
    snippets = next(
        e["pymdownx.snippets"]
        for e in config["markdown_extensions"]
        if isinstance(e, dict) and "pymdownx.snippets" in e
    )
    options = {**snippets, "base_path": [str(ROOT / p) for p in snippets["base_path"]]}
    md = markdown.Markdown(
        extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": options}
    )
    return len(md.preprocessors["snippet"].run(page.read_text("utf-8").split("\n")))


def test_no_page_is_longer_than_a_reader_can_follow() -> None:
    lengths = {page.name: rendered_lines(page) for page in sorted(DOCS.glob("*.md"))}
    too_long = {
        name: n
        for name, n in lengths.items()
        if n > MAX_RENDERED_LINES and name not in NOT_YET_SPLIT
    }
    assert too_long == {}, (
        f"over {MAX_RENDERED_LINES} rendered lines (the markdown with its --8<-- includes "
        "expanded): split each where the reader's question changes, move the sections with their "
        "anchors and fix the links to them (mkdocs build --strict finds those), and add the new "
        "page to mkdocs.yml's nav, docs/index.md's chapter table and README.md's page table"
    )
    stale = {
        name: lengths.get(name)
        for name in NOT_YET_SPLIT
        if lengths.get(name, 0) <= MAX_RENDERED_LINES
    }
    assert stale == {}, "short enough now: remove from NOT_YET_SPLIT"
