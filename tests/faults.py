"""Faults planted in scratch copies, to show that a check catches what it is there for."""

from __future__ import annotations

from pathlib import Path


def plant(path: Path, old: str, new: str) -> None:
    """The first `old` in `path` replaced by `new`; `old` must be there, or nothing is planted."""
    text = path.read_text("utf-8")
    assert old in text, f"{path.name} no longer has {old!r} to plant a fault at"
    path.write_text(text.replace(old, new, 1), "utf-8")
