"""Writes what the last complete, green test run verified, for the index page to include.

`docs/.verified.json` keeps one entry per PostgreSQL major version, so the embedded 16 run and CI's
system 15 run add up; an entry made from other page contents (a different fingerprint) is dropped.
`docs/.verified.md` is what the index page includes: a badge (`docs/assets/verified.svg`) with the
PostgreSQL versions and drivers, and a sentence with the rest. None of them is typed by hand.
"""

from __future__ import annotations

import hashlib
import json
import platform
from html import escape
from importlib.metadata import version

from tests.blocks import DOCS

JSON = DOCS / ".verified.json"
MARKDOWN = DOCS / ".verified.md"
BADGE = DOCS / "assets" / "verified.svg"


def fingerprint() -> str:
    """A hash of the pages and the package: a verification is only valid for this content."""
    digest = hashlib.sha256()
    roots = [DOCS, DOCS.parent / "src"]
    for path in sorted(p for root in roots for p in root.rglob("*") if p.suffix in {".md", ".py"}):
        if not path.name.startswith("."):
            digest.update(path.relative_to(DOCS.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def record(server_version: str, blocks: int, consoles: int, exemptions: int) -> None:
    """Add this run's server to the record and rewrite the sentence on the index page."""
    current = fingerprint()
    try:
        entries: dict[str, dict[str, object]] = json.loads(JSON.read_text())
    except (OSError, ValueError):
        entries = {}
    entries = {k: v for k, v in entries.items() if v.get("fingerprint") == current}
    entries[server_version.split(".")[0]] = {
        "fingerprint": current,
        "postgresql": server_version.split()[0],
        "asyncpg": version("asyncpg"),
        "psycopg": version("psycopg"),
        "sqlalchemy": version("sqlalchemy"),
        "python": platform.python_version(),
        "blocks": blocks,
        "consoles": consoles,
        "exemptions": exemptions,
    }
    JSON.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    write(entries)


def write(entries: dict[str, dict[str, object]]) -> None:
    """The index page's badge and sentence, from the recorded entries."""
    MARKDOWN.write_text(markdown(entries))
    BADGE.parent.mkdir(exist_ok=True)
    BADGE.write_text(badge(entries))


def markdown(entries: dict[str, dict[str, object]]) -> str:
    alt = escape(f"Verified on {badge_text(entries)}")
    return f"![{alt}](assets/verified.svg)\n\n{sentence(entries)}\n"


def badge_text(entries: dict[str, dict[str, object]]) -> str:
    """`PostgreSQL 15.14, 16.2 · asyncpg 0.32.0 · psycopg 3.3.9`: every server, the drivers."""
    runs = [entries[k] for k in sorted(entries, key=int)]
    servers = ", ".join(str(run["postgresql"]) for run in runs)
    return f"PostgreSQL {servers} · asyncpg {runs[-1]['asyncpg']} · psycopg {runs[-1]['psycopg']}"


def badge(entries: dict[str, dict[str, object]]) -> str:
    """A two-part SVG badge, "verified" and `badge_text`; textLength fits it in any font."""
    label, value = "verified", escape(badge_text(entries))
    left, right = 10 + round(6.5 * len(label)), 10 + round(6.5 * len(badge_text(entries)))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right}" height="20" role="img" '
        f'aria-label="{label}: {value}">\n'
        f"  <title>{label}: {value}</title>\n"
        f'  <rect width="{left}" height="20" fill="#555"/>\n'
        f'  <rect x="{left}" width="{right}" height="20" fill="#3f51b5"/>\n'
        '  <g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" '
        'text-anchor="middle">\n'
        f'    <text x="{left / 2}" y="14" textLength="{left - 10}">{label}</text>\n'
        f'    <text x="{left + right / 2}" y="14" textLength="{right - 10}">{value}</text>\n'
        "  </g>\n"
        "</svg>\n"
    )


def sentence(entries: dict[str, dict[str, object]]) -> str:
    runs = [entries[k] for k in sorted(entries, key=int)]
    servers = " and ".join(f"**PostgreSQL {run['postgresql']}**" for run in runs)
    last = runs[-1]
    exempt = int(str(last["exemptions"]))
    return (
        f"Every block on this site ran on {servers}, under **asyncpg {last['asyncpg']}** and "
        f"**psycopg {last['psycopg']}** (SQLAlchemy {last['sqlalchemy']}, Python "
        f"{last['python']}): {last['blocks']} Python blocks and {last['consoles']} console blocks "
        f"per driver, {exempt} exemption{'' if exempt == 1 else 's'} listed by the run. "
        "This sentence was written by that test run."
    )


if (
    __name__ == "__main__"
):  # `python -m tests.verified`: the badge and sentence again, from the JSON
    write(json.loads(JSON.read_text()))
