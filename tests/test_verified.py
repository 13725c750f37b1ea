"""A green `make test` changes no tracked file: what the run writes lands where git ignores it, the
record of a complete run among it, and the site build turns the records of the content it builds
into the index page's box and badge ("not verified in this build" without one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from mkdocs.exceptions import PluginError
from sqlalchemy import make_url

from tests import verified
from tests.blocks import expected_docs_tests
from tests.browser import ARTIFACTS
from tests.databases import Server
from tests.report import Report, changed, working_tree

pytest_plugins = ["pytester"]

ROOT = verified.ROOT


def not_ignored(root: Path, paths: list[Path]) -> list[str]:
    """The paths git would show in `git status` if they were written (neither ignored nor,
    for a tracked file, unchanged)."""
    relative = [path.relative_to(root).as_posix() for path in paths]
    result = subprocess.run(
        ["git", "check-ignore", "--", *relative],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: none of them is ignored
    return sorted(set(relative) - set(result.stdout.splitlines()))


def _makefile(name: str) -> str:
    found = re.search(rf"^{name} := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, f"the Makefile no longer sets {name}"
    return found.group(1)


def run_writes() -> list[Path]:
    """Everything `make test` writes into the checkout, named where the harness names it."""
    site = re.search(r"--site-dir (\S+)", (ROOT / "Makefile").read_text())
    assert site, "the Makefile no longer builds the site with --site-dir"
    return [
        ROOT / verified.RECORDS / "pg16.json",  # the record a complete green run writes
        ROOT / verified.RECORDS / "pg16.json.tmp",  # and its file while it is written
        ARTIFACTS / "light" / "index.png",  # the browser test's screenshots
        ARTIFACTS.parent / "report.json",
        ROOT / site.group(1) / "index.html",  # `make site`, after the tests
        ROOT / _makefile("MERMAID_JS"),  # fetched with npm before the tests
        ROOT / ".cache" / "mermaid-12.3.0.tgz",
        ROOT / _makefile("VENV") / "bin" / "python",  # `make` bootstraps the virtualenv
        ROOT / _makefile("VENV") / ".installed",
        ROOT / ".coverage",  # pytest-cov, combined from the workers' .coverage.<host>.<pid>...
        ROOT / ".coverage.host.1234.XdGxyz",
        ROOT / ".pytest_cache" / "v" / "cache" / "lastfailed",
        ROOT / ".mypy_cache" / "3.11" / "dblayer" / "settings.data.json",  # make lint
        ROOT / ".ruff_cache" / "CACHEDIR.TAG",
        ROOT / "src" / "dblayer" / "__pycache__" / "settings.cpython-311.pyc",
        ROOT / "tests" / "__pycache__" / "conftest.cpython-311-pytest-8.4.2.pyc",
        ROOT / "src" / "dblayer.egg-info" / "PKG-INFO",  # pip install -e
    ]


def test_what_the_run_writes_is_ignored_by_git() -> None:
    assert not_ignored(ROOT, run_writes()) == []


def test_the_check_sees_a_write_git_would_show() -> None:
    """Where the old harness wrote its record, and a tracked page: both would dirty the tree."""
    old_record = [ROOT / "docs" / ".verified.json", ROOT / "docs" / "assets" / "verified.svg"]
    assert not_ignored(ROOT, [*old_record, ROOT / "docs" / "index.md"]) == [
        "docs/.verified.json",
        "docs/assets/verified.svg",
        "docs/index.md",
    ]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_the_run_report_sees_every_change_git_would_show(tmp_path: Path) -> None:
    """The report compares `git status` before and after the run: a tracked file changed, a new
    file, a file that was already changed and is changed again; an ignored file is no change."""
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    for name in ("page.md", "dirty.md", "kept.md"):
        (tmp_path / name).write_text("as committed\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "start")
    (tmp_path / "dirty.md").write_text("edited before the run\n")
    (tmp_path / "kept.md").write_text("edited before the run\n")
    before = working_tree(tmp_path)
    assert before is not None
    assert sorted(before) == ["dirty.md", "kept.md"]
    (tmp_path / "page.md").write_text("changed by the run\n")
    (tmp_path / "dirty.md").write_text("changed again by the run\n")
    (tmp_path / "new.md").write_text("written by the run\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "record.json").write_text("{}\n")
    after = working_tree(tmp_path)
    assert after is not None
    assert changed(before, after) == ["dirty.md", "new.md", "page.md"]
    assert changed(after, after) == []
    assert working_tree(tmp_path / "ignored" / "nowhere") is None  # not a checkout: no check


def _report(version: str = "16.2 (Debian 16.2-1.pgdg120+1)") -> Report:
    server = Server(make_url("postgresql://u@127.0.0.1:1/postgres"), "for the test", version)
    report = Report(server=server, content=verified.fingerprint())
    report.blocks.update(asyncpg=60, psycopg=58)
    report.consoles.update(asyncpg=13, psycopg=13)
    report.exemptions = {"docs/x.md:1": "a reason"}
    return report


def test_a_complete_run_records_what_it_verified(tmp_path: Path) -> None:
    report = _report()
    report.finished = expected_docs_tests()
    record = report.record()
    assert record is not None
    path = record.write(tmp_path)
    assert path == tmp_path / ".cache" / "verified" / "pg16.json"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    written = json.loads(path.read_text())
    assert written["postgresql"] == "16.2"
    assert written["fingerprint"] == verified.fingerprint()
    assert written["drivers"]["asyncpg"]["blocks"] == 60
    assert written["drivers"]["psycopg"] == {
        "blocks": 58,
        "consoles": 13,
        "version": version("psycopg"),
    }
    assert written["exemptions"] == 1
    assert set(written) == {
        "fingerprint",
        "postgresql",
        "drivers",
        "sqlalchemy",
        "python",
        "exemptions",
    }


def test_an_incomplete_run_records_nothing() -> None:
    """A run that skipped blocks (a trusting server skips the wrong-password ones), or of
    content edited while it ran, verified less than the pages: no record."""
    report = _report()
    report.finished = expected_docs_tests() - 1
    assert report.record() is None
    report.finished = expected_docs_tests()
    report.content = "0" * 16
    assert report.record() is None


def copy_for_build(destination: Path) -> Path:
    """What git would check out (tracked and new files), and a stand-in for npm's mermaid."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, destination / name)
    stand_in = destination / "docs" / "assets" / "vendor" / "mermaid.min.js"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("// the build only links it\n")
    return destination


def build(checkout: Path) -> tuple[str, str]:
    """`mkdocs build --strict` of the checkout: its index page's text and its badge."""
    env = {**os.environ, "MERMAID_JS": "assets/vendor/mermaid.min.js", "NO_MKDOCS_2_WARNING": "1"}
    env.pop("SITE_URL", None)
    site = checkout / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = re.sub(r"<[^>]+>", " ", (site / "index.html").read_text("utf-8"))
    return " ".join(text.split()), (site / verified.BADGE).read_text("utf-8")


def _record(root: Path, version: str, content: str) -> None:
    verified.Record(
        fingerprint=content,
        postgresql=version,
        drivers={
            "asyncpg": {"version": "0.32.0", "blocks": 60, "consoles": 13},
            "psycopg": {"version": "3.3.9", "blocks": 60, "consoles": 13},
        },
        sqlalchemy="2.1.9",
        python="3.11.7",
        exemptions=5,
    ).write(root)


def test_a_site_without_records_says_it_is_not_verified(tmp_path: Path) -> None:
    checkout = copy_for_build(tmp_path / "checkout")
    assert not (checkout / verified.RECORDS).exists()
    page, badge = build(checkout)
    assert "Not verified in this build" in page
    assert "not verified in this build" in badge


def _recorded_checkout(destination: Path) -> Path:
    """A copy with records of this content on 14.23 and 16.14, and one of other content."""
    checkout = copy_for_build(destination)
    content = verified.fingerprint(checkout)
    assert content == verified.fingerprint()  # the copy is this content
    _record(checkout, "14.23", content)
    _record(checkout, "16.14", content)
    _record(checkout, "15.18", "0123456789abcdef")  # a run of other content: not shown
    return checkout


# The three builds are three tests: xdist runs them side by side.
def test_the_site_shows_the_records_of_the_content_it_builds(tmp_path: Path) -> None:
    page, badge = build(_recorded_checkout(tmp_path / "checkout"))
    assert "Not verified" not in page
    assert "ran, unchanged, on PostgreSQL 14.23 and 16.14 , under asyncpg and psycopg" in page
    assert "in complete, green test runs, one per server, of exactly these pages" in page
    assert "14.23 0.32.0 3.3.9 2.1.9 3.11.7 60 per driver 13 per driver 5" in page
    assert "15.18" not in page
    assert "verified: PostgreSQL 14.23, 16.14 · asyncpg 0.32.0 · psycopg 3.3.9" in badge
    assert "15.18" not in badge


def test_an_edited_page_is_content_no_run_verified(tmp_path: Path) -> None:
    """An edit to a page (or to the package) is content no run verified."""
    checkout = _recorded_checkout(tmp_path / "checkout")
    guide = checkout / "docs" / "sessions.md"
    guide.write_text(guide.read_text("utf-8") + "\nOne more sentence.\n", "utf-8")
    page, badge = build(checkout)
    assert "Not verified in this build" in page
    assert "not verified in this build" in badge


def test_a_record_that_is_not_one_fails_the_build(tmp_path: Path) -> None:
    (tmp_path / verified.RECORDS).mkdir(parents=True)
    (tmp_path / verified.RECORDS / "pg16.json").write_text('{"postgresql": "16.2"}')
    with pytest.raises(PluginError, match=r"pg16\.json: not a record of a test run"):
        verified.records(tmp_path)


def test_the_index_page_has_the_line_the_record_replaces() -> None:
    assert verified.MARKER.search((ROOT / "docs" / "index.md").read_text("utf-8"))


def test_the_fingerprint_is_of_what_the_run_ran(tmp_path: Path) -> None:
    """Pages, package, harness, alembic.ini, mkdocs.yml: an edit to any is new content; a
    benchmark table, compiled files and pip's metadata are not."""
    files = {
        "docs/index.md": "# Home\n",
        "src/dblayer/settings.py": "X = 1\n",
        "src/dblayer/migrations/script.py.mako": "${up}\n",
        "tests/blocks.py": "NORMALISE = []\n",
        "alembic.ini": "[alembic]\n",
        "mkdocs.yml": "site_name: x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    first = verified.fingerprint(tmp_path)
    for name in (
        "docs/.bench/pooling.md",
        "src/dblayer/__pycache__/settings.cpython-311.pyc",
        "src/dblayer.egg-info/PKG-INFO",
        "docs/assets/vendor/mermaid.min.js",
        "tests/__pycache__/blocks.cpython-311.pyc",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("not content\n")
    assert verified.fingerprint(tmp_path) == first
    for name in files:
        original = (tmp_path / name).read_text()
        (tmp_path / name).write_text(original + "edited\n")
        assert verified.fingerprint(tmp_path) != first, name
        (tmp_path / name).write_text(original)
    assert verified.fingerprint(tmp_path) == first


def test_a_run_of_some_tests_records_nothing(pytester: pytest.Pytester) -> None:
    """Only a run of the whole suite, as `make test` selects it, may say it verified the pages:
    naming test files, `-k`, another marker expression or `--lf` records nothing."""
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    (pytester.path / "tests").mkdir()
    report = _report()
    report.finished = expected_docs_tests()
    assert report.record(pytester.parseconfig()) is not None
    assert report.record(pytester.parseconfig("-m", "not slow")) is not None  # make test
    for args in (["-k", "engine"], ["tests/test_docs.py"], ["-m", "slow"], ["--lf"]):
        assert report.record(pytester.parseconfig(*args)) is None, args


def test_ci_builds_only_with_a_record_of_every_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUIRE_VERIFIED_MAJORS (CI's site build): a major with no record of this content, or
    only a stale one, fails the build instead of leaving the badge a major short."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n")
    counts = {"asyncpg": 60, "psycopg": 60}
    for server, content in (("16.14", verified.fingerprint(tmp_path)), ("17.10", "0" * 16)):
        verified.Record.of_this_run(content, server, counts, counts, 0).write(tmp_path)
    monkeypatch.setenv("REQUIRE_VERIFIED_MAJORS", "16")
    assert [record.major for record in verified.records(tmp_path)] == [16]
    monkeypatch.setenv("REQUIRE_VERIFIED_MAJORS", "16 17 18")
    with pytest.raises(PluginError, match=r"no record of this content for PostgreSQL 17, 18$"):
        verified.records(tmp_path)
