"""The site as readers see it: every page in headless Chromium, offline (see `tests/browser.py`);
the checks shown to fail on faults planted in a scratch copy; the badge the run writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Playwright, sync_playwright

from tests.browser import (
    ARTIFACTS,
    MERMAID_JS,
    PALETTES,
    ROOT,
    BuildError,
    build,
    chapters,
    check_site,
    chromium,
    contrast,
    copy_checkout,
    pages,
    source,
)

DOCS = ROOT / "docs"
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
    assert report.links_checked > len(built)
    assert report.left_the_machine == []
    assert 'src="assets/verified.svg"' in (site / "index.html").read_text()  # the run's badge
    shots = {p.relative_to(ARTIFACTS).as_posix() for p in ARTIFACTS.rglob("*.png")}
    assert {f"light/{page.slug}.png" for page in pages(site, DOCS)} <= shots
    assert report.copy_checked
    (ARTIFACTS / "report.json").write_text(
        json.dumps({"pages": report.visited, "seconds": round(report.seconds, 1)}, indent=2)
    )


def plant(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert old in text, f"{path.name} no longer has {old!r} to plant a fault at"
    path.write_text(text.replace(old, new, 1), "utf-8")


@BROWSER_TIMEOUT
def test_planted_faults_are_caught(
    browser_path: str, playwright: Playwright, tmp_path: Path
) -> None:
    """Faults planted in a scratch copy of the checkout: the strict build rejects the markdown
    link to a missing page; the browser finds that and each fault the build lets through."""
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
    plant(
        page,
        "```mermaid\n",
        "```mermaid\nflowchart LR\n    A -->|unclosed label B\n```\n\n```mermaid\n",
    )
    plant(
        page,
        "\n## ",
        "\n[Gone](no-such-page.md), [a section that is not there]"
        f"({os.path.relpath(other, page.parent)}#no-such-section), "
        '<a href="../no-such-chapter/">a raw link</a>.\n\n'
        '<img src="https://cdn.invalid/tracker.png" alt="from elsewhere">\n\n'
        "```mermaid\nflowchart LR\n    pale[pale on pale]\n"
        "    style pale fill:#ffffff,stroke:#999999,color:#f4f4f4\n```\n\n## ",
    )
    site = tmp_path / "site"
    with pytest.raises(BuildError, match=r"no-such-page\.md"):
        build(checkout, site)
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
        "markdown link to a missing page": r"link to a missing page: /[\w/-]*no-such-page\.md$",
        "raw link to a missing page": r"link to a missing page: /no-such-chapter/$",
        "missing anchor": rf"link to a missing anchor: /{re.escape(other_url)}#no-such-section$",
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
