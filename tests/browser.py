"""The built site as a reader sees it: every page opened in headless Chromium, with no network.

`build` runs `mkdocs build --strict` on a checkout (or a scratch copy of one) with mermaid's
JavaScript from `docs/assets/vendor` (the Makefile fetches it from the npm registry); MkDocs itself
checks every link and anchor there (`validation:` in mkdocs.yml). `serve` serves the result on
127.0.0.1; `check_site` opens the pages and returns what only a browser sees, one line each:
console errors, diagrams that did not render or are hard to read in either palette, missing copy
buttons or tabs, chapters search does not find, requests that tried to leave the machine. The lists
of pages and chapters come from the built site and `mkdocs.yml`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from playwright.sync_api import ConsoleMessage, Page, Playwright, Request
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.paths import ROOT

MERMAID_JS = "assets/vendor/mermaid.min.js"  # under docs/, where `make` puts it
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"  # git-ignored
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium quiet, and with a proxy that refuses everything not on the loopback (which Chromium
# never proxies): the site must render with no network, and a request that tries is recorded.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--proxy-server=http://127.0.0.1:9",
]
MIN_CONTRAST = 4.5  # WCAG AA for normal text
PALETTES = {"default": "default", "slate": "dark"}  # Material's scheme -> mermaid's theme
_HIDE_HEADER = ".md-header, .md-tabs { visibility: hidden !important; }"


def chromium() -> str | None:
    """The browser: $CHROMIUM if set, else the first of the usual names on PATH."""
    names = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else BROWSERS
    return next((found for name in names if (found := shutil.which(name))), None)


class BuildError(Exception):
    """`mkdocs build --strict` failed; the message is its output."""


def build(checkout: Path, site: Path, **variables: str) -> None:
    """Build `checkout`'s site into `site` strictly, mermaid from the checkout's vendored copy;
    the site's address and repository unset unless given in `variables` (REPO_URL=…)."""
    env = {**os.environ, "MERMAID_JS": MERMAID_JS, "NO_MKDOCS_2_WARNING": "1"}
    for name in ("SITE_URL", "REPO_URL", "REPO_NAME"):
        env.pop(name, None)
    env.update(variables)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise BuildError(result.stdout + result.stderr)


_NOT_COPIED = {".git", ".venv", "site", "test-artifacts", ".cache"}


def copy_checkout(destination: Path) -> Path:
    """A scratch copy of the checkout, for the site build (pages, mkdocs.yml, included files)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith("_cache")}
        return skip | (_NOT_COPIED & set(names) if Path(directory) == ROOT else set())

    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the browser dropping a connection it no longer needs


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve `site` on 127.0.0.1 (a free port) and yield its base URL."""
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass(frozen=True)
class SitePage:
    url: str  # relative to the site's root: "" for the home page, "orm/" for orm.md
    source: Path  # its markdown

    @property
    def slug(self) -> str:
        return self.url.strip("/").replace("/", "-") or "index"


def pages(site: Path, docs: Path) -> list[SitePage]:
    """Every page of the built site (not 404.html), with the markdown it was built from."""
    found = []
    for html in sorted(site.rglob("index.html")):
        url = html.parent.relative_to(site).as_posix()
        url = "" if url == "." else url + "/"
        if not url.startswith(("assets/", "search/")):
            found.append(SitePage(url, source(docs, url)))
    return found


def source(docs: Path, url: str) -> Path:
    """The markdown a page was built from: "orm/" from orm.md or orm/index.md."""
    candidates = [docs / (url.rstrip("/") + ".md"), docs / url / "index.md"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no markdown in {docs} for the page {url!r}")
    return found


class TaglessLoader(yaml.SafeLoader):
    """mkdocs.yml without its tags (`!ENV`, `!!python/name:`): only the nav is read."""


TaglessLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def chapters(mkdocs_yml: Path) -> dict[str, str]:
    """The nav's pages, in order: url -> title."""
    nav = yaml.load(mkdocs_yml.read_text("utf-8"), TaglessLoader)["nav"]  # noqa: S506
    found: dict[str, str] = {}

    def walk(items: list[Any]) -> None:
        for item in items:
            title, target = next(iter(item.items())) if isinstance(item, dict) else (None, item)
            if isinstance(target, list):
                walk(target)
            elif isinstance(target, str) and target.endswith(".md"):
                stem = target.removesuffix(".md")
                url = "" if stem == "index" else stem.removesuffix("/index") + "/"
                found[url] = title or stem

    walk(nav)
    return found


@dataclass
class Report:
    """What the browser saw: problems (empty when all is well), and what it looked at."""

    problems: list[str] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)
    diagrams: Counter[str] = field(default_factory=Counter)  # mermaid theme -> diagrams checked
    texts_checked: int = 0  # diagram labels whose contrast was measured
    copy_checked: bool = False
    left_the_machine: list[str] = field(default_factory=list)
    seconds: float = 0.0


# The labels of a diagram: every element with text of its own, its colour and box (relative to
# the diagram), to compare with the pixels behind it.
_LABELS_JS = """
host => {
  const origin = host.getBoundingClientRect();
  const labels = [];
  for (const el of host.querySelectorAll("svg *")) {
    if (["style", "title", "desc", "script"].includes(el.localName)) continue;
    const text = [...el.childNodes].filter(n => n.nodeType === Node.TEXT_NODE)
      .map(n => n.textContent).join("").trim();
    if (!text) continue;
    const style = getComputedStyle(el);
    const box = el.getBoundingClientRect();
    if (style.visibility !== "visible" || box.width < 2 || box.height < 2) continue;
    labels.push({text, color: el instanceof SVGElement ? style.fill : style.color,
                 x: box.x - origin.x, y: box.y - origin.y, width: box.width, height: box.height});
  }
  return labels;
}
"""

_PAGE_JS = """
() => ({
  code: document.querySelectorAll(".md-content pre > code").length,
  copy: document.querySelectorAll(".md-content button.md-code__button[data-md-type=copy]").length,
  tabs: [...document.querySelectorAll(".md-content .tabbed-labels > label")]
    .map(l => l.textContent.trim()),
  diagrams: [...document.querySelectorAll(".md-content div.mermaid")]
    .map(d => d.querySelector(":scope > svg") ? d.dataset.theme : "failed"),
  broken_images: [...document.images].filter(i => !i.complete || !i.naturalWidth)
    .map(i => i.getAttribute("src")),
})
"""


def check_site(
    playwright: Playwright,
    browser_path: str,
    site: Path,
    docs: Path,
    mkdocs_yml: Path,
    only: list[str] | None = None,
    screenshots: Path | None = None,
) -> Report:
    """Open every page (or the `only` urls) in Chromium and report what is wrong."""
    started = time.perf_counter()
    report = Report()
    all_pages = pages(site, docs)
    chosen = [p for p in all_pages if only is None or p.url in only]
    browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
    try:
        with serve(site) as base:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(30_000)  # every action and wait fails, never hangs
            context.on("request", functools.partial(_record_request, base, report))
            tab = context.new_page()
            console: list[str] = []
            tab.on("console", functools.partial(_record_console, console))
            tab.on("pageerror", lambda error: console.append(f"uncaught {error}"))
            for page in chosen:
                console.clear()
                _visit(tab, base, site, page, report, screenshots)
                report.problems += [f"{page.url or '/'}: console: {m}" for m in console]
                report.visited.append(page.url)
            console.clear()
            _check_search(tab, base, site, chapters(mkdocs_yml), report)
            report.problems += [f"search: console: {m}" for m in console]
            context.close()
    finally:
        browser.close()
    for url in report.left_the_machine:
        report.problems.append(f"a request tried to leave the machine: {url}")
    report.seconds = time.perf_counter() - started
    return report


def _record_request(base: str, report: Report, request: Request) -> None:
    if not request.url.startswith((base, "data:", "blob:")):
        report.left_the_machine.append(request.url)


def _record_console(console: list[str], message: ConsoleMessage) -> None:
    if message.type == "error":
        console.append(message.text)


def _visit(
    tab: Page, base: str, site: Path, page: SitePage, report: Report, screenshots: Path | None
) -> None:
    where = page.url or "/"
    tab.goto(base + page.url)
    markdown = page.source.read_text("utf-8")
    expected_diagrams = (
        (site / page.url / "index.html").read_text("utf-8").count('<pre class="mermaid">')
    )
    if expected_diagrams:
        _wait_for_diagrams(tab, where, report)
    found = tab.evaluate(_PAGE_JS)
    for image in found["broken_images"]:
        report.problems.append(f"{where}: the image {image} did not load")
    # Every block of code has Material's copy button; a page with code fences has some.
    has_code = re.search(r"^ *```+ *\{?\.?(?!mermaid\b)\w", markdown, re.M) is not None
    if found["copy"] != found["code"] or (has_code and not found["copy"]):
        report.problems.append(
            f"{where}: {found['copy']} copy buttons for {found['code']} blocks of code"
        )
    elif found["copy"] and not report.copy_checked:
        _check_copy(tab, where, report)  # once: it is the same button on every page
        report.copy_checked = True
    # Tabs: what the markdown asks for (`=== "asyncpg"`) is what the page shows.
    wanted_tabs = Counter(re.findall(r'^ *=== "([^"]+)"', markdown, re.M))
    if Counter(found["tabs"]) != wanted_tabs:
        wanted = sorted(wanted_tabs.elements())
        report.problems.append(f"{where}: tabs {sorted(found['tabs'])}, the markdown has {wanted}")
    elif "psycopg" in wanted_tabs:
        _check_driver_tabs(tab, where, report)
    # Diagrams: each one an SVG in the palette's theme, readable, in both palettes.
    drawn: list[str] = found["diagrams"]
    if drawn != [PALETTES["default"]] * expected_diagrams:
        report.problems.append(f"{where}: {expected_diagrams} mermaid blocks, drawn: {drawn}")
    _screenshot(tab, screenshots, "light", page)
    if PALETTES["default"] in drawn:
        _check_palettes(tab, where, page, report, screenshots)


_DRAWN_JS = """
theme => [...document.querySelectorAll("div.mermaid")]
  .every(d => theme ? d.dataset.theme === theme : d.dataset.theme)
"""


def _wait_for_diagrams(tab: Page, where: str, report: Report, theme: str | None = None) -> bool:
    """Until docs/assets/javascripts/diagrams.js has drawn every diagram (in `theme`, if given),
    or failed to; False, with a problem, when that does not happen."""
    try:
        tab.wait_for_function(_DRAWN_JS, arg=theme, timeout=15_000)
    except PlaywrightTimeoutError:
        report.problems.append(f"{where}: diagrams not drawn{f' in {theme}' if theme else ''}")
        return False
    return True


# What a copy puts on the clipboard, read from the page's own `copy` event (clipboard.js copies
# from a selected, hidden textarea). Reading the system clipboard back instead hung two full runs
# (never this test alone): `evaluate` waits for `navigator.clipboard.readText()` without a limit.
_WATCH_COPY_JS = """
() => document.addEventListener("copy", () => {
  const el = document.activeElement;
  window.__copied = el && "value" in el
    ? el.value.substring(el.selectionStart, el.selectionEnd)
    : String(document.getSelection());
}, {once: true})
"""


def _check_copy(tab: Page, where: str, report: Report) -> None:
    """Press the first copy button: what it copies is that block's code."""
    tab.evaluate(_WATCH_COPY_JS)
    tab.locator(".md-content button.md-code__button[data-md-type=copy]").first.click()
    try:
        copied = tab.wait_for_function("() => window.__copied", timeout=5_000).json_value()
    except PlaywrightTimeoutError:
        report.problems.append(f"{where}: the copy button copied nothing")
        return
    code = tab.locator(".md-content pre > code").first.inner_text()
    if str(copied).strip() != code.strip():
        report.problems.append(f"{where}: the copy button copied {str(copied)[:60]!r}")


_DRIVER_TABS_JS = """
() => [...document.querySelectorAll(".md-content .tabbed-set")].flatMap(set => {
  const labels = [...set.querySelectorAll(":scope > .tabbed-labels > label")];
  if (!labels.some(l => l.textContent.trim() === "psycopg")) return [];
  const index = labels.findIndex(l => document.getElementById(l.htmlFor).checked);
  const block = set.querySelectorAll(":scope > .tabbed-content > .tabbed-block")[index];
  const visible = Boolean(block && block.getClientRects().length && block.innerText.trim());
  return [visible ? labels[index].textContent.trim() : "nothing"];
})
"""


def _check_driver_tabs(tab: Page, where: str, report: Report) -> None:
    """Choosing psycopg in one tab set shows psycopg in every driver tab set (linked tabs)."""
    labels = tab.locator(".md-content .tabbed-labels > label")
    labels.filter(has_text=re.compile("^psycopg$")).first.click()
    shown = tab.evaluate(_DRIVER_TABS_JS)
    if not shown or set(shown) != {"psycopg"}:
        report.problems.append(f"{where}: after choosing psycopg the driver tabs show {shown}")
    labels.filter(has_text=re.compile("^asyncpg$")).first.click()


def _check_palettes(
    tab: Page, where: str, page: SitePage, report: Report, screenshots: Path | None
) -> None:
    """Readable diagrams in the light palette, then in the dark one (the reader's toggle, which
    draws them again), and back. Each diagram's picture in each palette is kept."""
    toggle = tab.locator("form[data-md-component=palette] label:visible")
    _check_legibility(tab, where, page, "default", report, screenshots)
    toggle.dispatch_event("click")  # to slate
    if _wait_for_diagrams(tab, where, report, PALETTES["slate"]):
        _check_legibility(tab, where, page, "slate", report, screenshots)
    toggle.dispatch_event("click")  # back to light, for the pages after this one
    _wait_for_diagrams(tab, where, report, PALETTES["default"])


def _check_legibility(
    tab: Page, where: str, page: SitePage, scheme: str, report: Report, screenshots: Path | None
) -> None:
    actual = tab.evaluate("document.body.getAttribute('data-md-color-scheme')")
    if actual != scheme:
        report.problems.append(f"{where}: the palette is {actual!r}, not {scheme!r}")
        return
    diagrams = tab.locator(".md-content div.mermaid")
    for index in range(diagrams.count()):
        diagram = diagrams.nth(index)
        if diagram.locator(":scope > svg").count() == 0:
            continue  # failed to draw: reported already
        report.diagrams[PALETTES[scheme]] += 1
        labels = diagram.evaluate(_LABELS_JS)
        report.texts_checked += len(labels)
        picture = diagram.screenshot(style=_HIDE_HEADER)
        if screenshots is not None:
            name = (
                f"{'light' if scheme == 'default' else 'dark'}/{page.slug}-diagram-{index + 1}.png"
            )
            (screenshots / name).parent.mkdir(parents=True, exist_ok=True)
            (screenshots / name).write_bytes(picture)
        for problem in _illegible_labels(picture, labels):
            report.problems.append(f"{where}: diagram {index + 1} ({scheme}): {problem}")


def _illegible_labels(picture: bytes, labels: list[dict[str, Any]]) -> list[str]:
    """Each label's colour against the colour most of its box shows: the pixels behind it."""
    if not labels:
        return ["no labels found"]
    image = Image.open(io.BytesIO(picture)).convert("RGB")
    problems = []
    for label in labels:
        color = _rgb(label["color"])
        if color is None:
            problems.append(f"{label['text']!r}: unreadable colour {label['color']!r}")
            continue
        box = (
            max(0, round(label["x"])),
            max(0, round(label["y"])),
            min(image.width, round(label["x"] + label["width"])),
            min(image.height, round(label["y"] + label["height"])),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        region = image.crop(box)
        colours = region.getcolors(region.width * region.height) or []
        _, background = max(colours, key=lambda counted: counted[0])  # the most frequent
        assert isinstance(background, tuple)
        ratio = contrast(color, background)
        if ratio < MIN_CONTRAST:
            problems.append(
                f"{label['text']!r} in rgb{color} on rgb{background}: contrast {ratio:.1f}"
            )
    return problems


def _rgb(css: str) -> tuple[int, int, int] | None:
    match = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", css)
    if not match or (match.group(4) is not None and float(match.group(4)) < 1):
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def contrast(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours, from 1 (none) to 21 (black on white)."""

    def luminance(rgb: tuple[int, ...]) -> float:
        r, g, b = (c / 255 for c in rgb[:3])
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _screenshot(tab: Page, folder: Path | None, palette: str, page: SitePage) -> None:
    """The page as a reader first sees it (a whole page costs seconds: its diagrams are kept
    whole, in both palettes, by `_check_legibility`)."""
    if folder is not None:
        path = folder / palette / f"{page.slug}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=path)


def _check_search(tab: Page, base: str, site: Path, nav: dict[str, str], report: Report) -> None:
    """The search index has every chapter; typing the last chapter's title in the search box
    finds it (Material's search worker, offline)."""
    index = json.loads((site / "search" / "search_index.json").read_text("utf-8"))
    titles = {doc["location"]: doc["title"] for doc in index["docs"] if "#" not in doc["location"]}
    for url, title in nav.items():
        if url not in titles:
            report.problems.append(f"search: the chapter {title!r} ({url or '/'}) is not indexed")
    last = next(reversed(nav))
    if last not in titles:
        return
    tab.keyboard.press("/")  # on the last page visited
    tab.keyboard.type(titles[last])
    try:
        tab.wait_for_function(
            "url => [...document.querySelectorAll('.md-search-result__link')]"
            ".some(a => a.href.split('?')[0].split('#')[0] === url)",
            arg=base + last,
            timeout=10_000,
        )
    except PlaywrightTimeoutError:
        report.problems.append(f"search: typing {titles[last]!r} does not find {base + last}")
