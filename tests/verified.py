"""What complete, green test runs verified: written by the run, read by the site build.

A run writes one record per PostgreSQL major, `.cache/verified/pg<major>.json` (git-ignored), so
nothing tracked changes: the exact server version, each driver's version and the blocks it ran,
SQLAlchemy's and Python's versions, and the fingerprint of the pages and the package it ran.
CI's runs on other majors write beside it (or are downloaded there) before the site is built.

The same file is an MkDocs hook (`hooks:` in mkdocs.yml): the build keeps the records whose
fingerprint is the content being built, and from them writes the index page's box, a sentence
and a table in place of its `<!-- verified -->` line, and the badge `assets/verified.svg`. With
none, both say "not verified in this build". MkDocs loads it by path, so it imports only the
standard library and MkDocs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass
from html import escape
from importlib.metadata import version
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
RECORDS = Path(".cache") / "verified"  # under the checkout: where runs write, the build reads
BADGE = "assets/verified.svg"  # in the built site only
MARKER = re.compile(r"^( *)<!-- verified -->$", re.M)  # the index page's line the box replaces
NOT_VERIFIED = "not verified in this build"
REQUIRED = "REQUIRE_VERIFIED_MAJORS"
# What a record is true of: the pages, the package, the harness that ran them (its fences and
# normalising), and the files that configure both (alembic.ini, mkdocs.yml).
CONTENT = ("docs", "src", "tests")
CONFIGURATION = ("alembic.ini", "mkdocs.yml")
SUFFIXES = {".md", ".py", ".ini", ".mako", ".yml"}


def fingerprint(root: Path = ROOT) -> str:
    """A hash of the pages, the package, the harness and their configuration: a record is only
    true of the content it ran, checked as it was. (`docs/.bench/`, measured by `make bench`, is
    not run.)"""
    digest = hashlib.sha256()
    paths = [
        *(root / name for name in CONFIGURATION),
        *(p for part in CONTENT for p in (root / part).rglob("*")),
    ]
    for path in sorted(p for p in paths if p.suffix in SUFFIXES and p.is_file()):
        parts = path.relative_to(root).parts
        if not any(part.startswith(".") or part.endswith(".egg-info") for part in parts):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """One complete, green run on one server."""

    fingerprint: str
    postgresql: str  # the exact server version, "16.2"
    drivers: dict[str, dict[str, str | int]]  # name -> version, blocks, consoles
    sqlalchemy: str
    python: str
    exemptions: int

    @property
    def major(self) -> int:
        return int(self.postgresql.split(".")[0])

    @classmethod
    def of_this_run(
        cls,
        content: str,
        server_version: str,
        blocks: dict[str, int],
        consoles: dict[str, int],
        exemptions: int,
    ) -> Record:
        return cls(
            fingerprint=content,
            postgresql=server_version.split()[0],  # "16.2 (Debian 16.2-1)" -> "16.2"
            drivers={
                name: {"version": version(name), "blocks": count, "consoles": consoles[name]}
                for name, count in blocks.items()
            },
            sqlalchemy=version("sqlalchemy"),
            python=platform.python_version(),
            exemptions=exemptions,
        )

    def write(self, root: Path = ROOT) -> Path:
        """`pg<major>.json` under the records directory, replaced whole (never half-written)."""
        directory = root / RECORDS
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"pg{self.major}.json"
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            f.write(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(f.name, path)
        return path


def records(root: Path = ROOT) -> list[Record]:
    """The records that are true of this content, one per major, oldest major first."""
    current = fingerprint(root)
    found = []
    for path in sorted((root / RECORDS).glob("pg*.json")):
        try:
            record = Record(**json.loads(path.read_text("utf-8")))
        except (ValueError, TypeError) as error:
            raise PluginError(f"{path}: not a record of a test run ({error})") from None
        if record.fingerprint == current:
            found.append(record)
    missing = set(required_majors()) - {record.major for record in found}
    if missing:
        # CI builds the published site only from a record of every major it ran.
        majors = ", ".join(str(major) for major in sorted(missing))
        raise PluginError(f"{REQUIRED}: no record of this content for PostgreSQL {majors}")
    return sorted(found, key=lambda record: record.major)


def required_majors() -> list[int]:
    """The majors `REQUIRE_VERIFIED_MAJORS="14 15 16 17 18"` names (set by CI's site build)."""
    return [int(major) for major in os.environ.get(REQUIRED, "").split()]


def summary(runs: list[Record]) -> str:
    """`PostgreSQL 15.18, 16.2 · asyncpg 0.32.0 · psycopg 3.3.9`, or NOT_VERIFIED."""
    if not runs:
        return NOT_VERIFIED
    servers = ", ".join(run.postgresql for run in runs)
    drivers = " · ".join(
        f"{name} {'/'.join(sorted({str(run.drivers[name]['version']) for run in runs}))}"
        for name in runs[0].drivers
    )
    return f"PostgreSQL {servers} · {drivers}"


def badge(runs: list[Record]) -> str:
    """A two-part SVG badge, "verified" and `summary`; textLength fits it in any font."""
    label, value = ("verified", summary(runs)) if runs else ("not verified", "in this build")
    title = escape(f"{label}: {value}" if runs else NOT_VERIFIED)
    fill = "#3f51b5" if runs else "#9e9e9e"
    left, right = 10 + round(6.5 * len(label)), 10 + round(6.5 * len(value))
    label, value = escape(label), escape(value)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right}" height="20" role="img" '
        f'aria-label="{title}">\n'
        f"  <title>{title}</title>\n"
        f'  <rect width="{left}" height="20" fill="#555"/>\n'
        f'  <rect x="{left}" width="{right}" height="20" fill="{fill}"/>\n'
        '  <g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" '
        'text-anchor="middle">\n'
        f'    <text x="{left / 2}" y="14" textLength="{left - 10}">{label}</text>\n'
        f'    <text x="{left + right / 2}" y="14" textLength="{right - 10}">{value}</text>\n'
        "  </g>\n"
        "</svg>\n"
    )


def box(runs: list[Record]) -> str:
    """The index page's admonition: the badge, a sentence, a table of every server."""
    image = f"![{escape(summary(runs))}]({BADGE})"
    if not runs:
        return (
            f'!!! warning "Not verified in this build"\n\n    {image}\n\n'
            "    This site was built without the record of a complete, green test run of "
            "these pages and this code: it was edited since, or built where the tests did not "
            "run. `make test` writes one (`.cache/verified/`); CI publishes the site with its "
            "records of every PostgreSQL major.\n"
        )
    servers = [f"**{run.postgresql}**" for run in runs]
    servers_text = " and ".join([", ".join(servers[:-1]), servers[-1]] if servers[1:] else servers)
    names = list(runs[0].drivers)
    runs_text = (
        "complete, green test runs, one per server," if runs[1:] else "a complete, green test run"
    )
    rows = "\n".join(
        f"    | {run.postgresql} | "
        + " | ".join(str(run.drivers[name]["version"]) for name in names)
        + f" | {run.sqlalchemy} | {run.python} | {_count(run, 'blocks')} | "
        f"{_count(run, 'consoles')} | {run.exemptions} |"
        for run in runs
    )
    return (
        f'!!! success "Verified"\n\n    {image}\n\n'
        f"    Every block on this site ran, unchanged, on PostgreSQL {servers_text}, under "
        f"{' and '.join(names)}: in {runs_text} of exactly these pages and this code, "
        "whose summary lists the exemptions.\n\n"
        f"    | PostgreSQL | {' | '.join(names)} | SQLAlchemy | Python | Python blocks "
        "| console blocks | exemptions |\n"
        f"    |---|{'---|' * len(names)}---|---|---|---|---|\n"
        f"{rows}\n"
    )


def _count(run: Record, kind: str) -> str:
    """`60 per driver`, or `60 asyncpg, 58 psycopg` where a block ran under one driver only."""
    counts = {name: run.drivers[name][kind] for name in run.drivers}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} per driver"
    return ", ".join(f"{count} {name}" for name, count in counts.items())


# The MkDocs hook: the badge as a file of the built site, the box on the index page.


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files: Files, config: MkDocsConfig) -> Files:
    stale = files.get_file_from_path(BADGE)
    if stale is not None:  # a badge left in docs/ by an older harness: the build's wins
        files.remove(stale)
    files.append(File.generated(config, BADGE, content=badge(records(_root(config)))))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    marker = MARKER.search(markdown)
    if marker is None:
        raise PluginError("index.md: the line `<!-- verified -->` the record goes in is missing")
    indent = marker.group(1)
    text = "\n".join(
        indent + line if line else line for line in box(records(_root(config))).splitlines()
    )
    return markdown[: marker.start()] + text + markdown[marker.end() :]
