"""Where things are: the checkout, its pages. Every test module takes its paths from here."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "dblayer"
