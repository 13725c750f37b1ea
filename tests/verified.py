"""Writes what the last complete, green test run verified, for the index page to include.

`docs/.verified.json` keeps one entry per PostgreSQL major version, so the embedded 16 run and CI's
system 15 run add up; an entry made from other page contents (a different fingerprint) is dropped.
`docs/.verified.md` is the sentence the index page includes. Neither is typed by hand.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import version

from tests.blocks import DOCS

JSON = DOCS / ".verified.json"
MARKDOWN = DOCS / ".verified.md"


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
    MARKDOWN.write_text(sentence(entries) + "\n")


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
