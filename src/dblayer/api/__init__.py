"""The HTTP API (the only package that imports FastAPI)."""

from dblayer.api.app import create_app
from dblayer.api.deps import SessionDep, get_session

__all__ = ["SessionDep", "create_app", "get_session"]
