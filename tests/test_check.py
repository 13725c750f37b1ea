"""`python -m dblayer.check`: one line and an exit status, both ways."""

from __future__ import annotations

import pytest
from sqlalchemy import URL

from dblayer import check


def test_ok_prints_the_version(
    monkeypatch: pytest.MonkeyPatch, database_url: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    assert check.main() == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: PostgreSQL 1")
    assert err == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://app:hunter2@h/db", "error: DATABASE_URL: unsupported 'mysql'"),
        ("postgresql://app:hunter2@127.0.0.1:1/app", "error: cannot connect to 127.0.0.1:1/app"),
    ],
)
def test_failure_is_one_line_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert check.main() == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "hunter2" not in err
