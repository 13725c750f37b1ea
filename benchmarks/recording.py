"""What every benchmark shares: which PostgreSQL to measure on, and where the table goes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from sqlalchemy import URL, make_url

from dblayer.embedded import EmbeddedPostgres, find_binaries

BENCH = Path(__file__).resolve().parent.parent / "docs" / ".bench"


def record(measure: Callable[[URL], Coroutine[Any, Any, str]], name: str) -> None:
    """Run `measure` on `DATABASE_URL`, or on an embedded PostgreSQL started for it; write the
    table it returns to docs/.bench/<name>.md (which a page includes) and print it."""
    configured = os.environ.get("DATABASE_URL")
    server = None if configured else EmbeddedPostgres(find_binaries()).start()
    try:
        url = make_url(configured) if configured else server.url()  # type: ignore[union-attr]
        result = asyncio.run(measure(url))
    finally:
        if server is not None:
            server.stop()
    BENCH.mkdir(exist_ok=True)
    (BENCH / f"{name}.md").write_text(result)
    print(result)
