"""Page cursors: the last row's sort value and key, signed, so a client cannot edit them.

Tamper-evident, not secret: the payload is readable base64 JSON, with an HMAC-SHA256 signature
over it and the model's name (see the repositories page).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from pydantic_core import to_jsonable_python

from dblayer.settings import get_settings


class InvalidCursorError(ValueError):
    """A cursor that was edited, signed under another key, or is not a cursor at all (the
    repository raises it as `InvalidQueryError`, a 422 in the API)."""


@cache
def default_cursor_secret() -> bytes:
    """`DB_CURSOR_SECRET`, read once per process; unset, a random key for this process only.

    The random default suits one process (a script, the tests). Several instances of an app, or
    several workers of one server, must share the setting to accept each other's cursors; with the
    default, each refuses the others', and a restart refuses all issued before it."""
    configured = get_settings().db_cursor_secret
    return secrets.token_bytes(32) if configured is None else configured.get_secret_value().encode()


def encode_cursor(key: bytes, model_name: str, sort: str, value: object, id: uuid.UUID) -> str:
    """An opaque, URL-safe token: the sort it belongs to and the last row's (value, id), signed."""
    return _encode_payload(key, model_name, [sort, to_jsonable_python(value), str(id)])


def _encode_payload(key: bytes, model_name: str, payload: list[Any]) -> str:
    """`<base64url JSON>.<base64url HMAC-SHA256>`; the signature also covers the model's name."""
    data = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"{data}.{_signature(key, model_name, data)}"


def _signature(key: bytes, model_name: str, data: str) -> str:
    digest = hmac.digest(key, f"{model_name}.{data}".encode(), "sha256")
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def decode_cursor(
    key: bytes, cursor: str, sort: str, model_name: str, validate: Callable[[Any], Any]
) -> tuple[Any, uuid.UUID]:
    """The (value, id) pair: the signature first (an edited or foreign cursor is refused), then
    the values, typed and checked by `validate` as if they came from the client."""
    data, _, signature = cursor.partition(".")
    expected = _signature(key, model_name, data)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise InvalidCursorError("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        cursor_sort, value, id = json.loads(raw)
        if cursor_sort != sort:
            raise InvalidCursorError("this cursor belongs to another sort order")
        return validate(value), uuid.UUID(id)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, InvalidCursorError):
            raise
        raise InvalidCursorError("invalid cursor") from None
