"""`python -m dblayer.scaffold`: what it writes, what it leaves, and that the project it writes
passes its own checks (alembic, its tests on this run's server, mypy --strict, ruff)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Any

import pytest

from dblayer import scaffold
from dblayer.scaffold import MANIFEST, Options, main, plan
from dblayer.scaffold.render import (
    ScaffoldError,
    canonical_text,
    definitions,
    drop,
    drop_members,
    rename,
    set_default,
    strip,
)
from dblayer.settings import DRIVERS, Driver
from tests.blocks import READERS_PYTEST
from tests.databases import Databases, Server
from tests.paths import ROOT


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def snapshot(project: Path) -> dict[str, tuple[str, int]]:
    """Every file's text and modification time: a run that changes nothing leaves both."""
    return {
        str(path.relative_to(project)): (path.read_text("utf-8"), path.stat().st_mtime_ns)
        for path in sorted(project.rglob("*"))
        if path.is_file()
    }


def test_an_empty_project_gets_every_file_and_a_second_run_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "shop"
    project.mkdir()
    status, out, _ = run(capsys, project, "--package", "shop")
    assert status == 0
    assert (
        out.splitlines()[0]
        == f"scaffolded package shop in {project} (src layout, asyncpg, FastAPI)"
    )
    assert "created  src/shop/migrations/env.py" in out
    assert "created  .env.example" in out
    assert "python -m shop.prestart" in out
    env = (project / ".env.example").read_text()
    assert "\nPOSTGRES_DB=shop\n" in env  # the package's name, not the guide's app
    assert "@localhost:5432/shop\n" in env
    before = snapshot(project)
    assert "src/shop/api/deps.py" in before
    status, out, _ = run(capsys, project, "--package", "shop")
    assert status == 0
    assert "created" not in out
    assert "skipped  src/shop/engine.py (exists)" in out
    assert "skipped  .env.example (has every key)" in out
    assert snapshot(project) == before
    status, out, _ = run(capsys, project, "--package", "shop", "--check")
    assert (status, out.splitlines()[-1]) == (0, "every file is the guide's current code")


def test_the_emitted_code_never_imports_dblayer() -> None:
    """Statically here; the runs below also put a `dblayer` that cannot be imported first on
    the path."""
    for file in plan(Options("shop")):
        if file.path.endswith(".py"):
            assert "import dblayer" not in file.text, file.path
            assert "from dblayer" not in file.text, file.path
            assert '"dblayer.' not in file.text, file.path


def test_a_project_keeps_its_files_and_gets_only_the_missing_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src" / "shop").mkdir(parents=True)
    (tmp_path / "src" / "shop" / "__init__.py").write_text('"""My shop."""\n')
    (tmp_path / "docker-compose.yml").write_text("services: {}\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    env = "# mine\nPOSTGRES_HOST=db\n# DATABASE_URL=postgresql://me@db/shop"  # no final newline
    (tmp_path / ".env.example").write_text(env)
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--driver", "psycopg")
    assert status == 0
    assert "skipped  src/shop/__init__.py (exists)" in out
    assert "skipped  docker-compose.yml (exists)" in out
    assert "skipped  pyproject.toml (exists)" in out
    assert "your pyproject.toml was left as it is" in out
    assert (tmp_path / "src" / "shop" / "__init__.py").read_text() == '"""My shop."""\n'
    text = (tmp_path / ".env.example").read_text()
    assert text.startswith(env + "\n# The database layer's settings")
    assert text.count("POSTGRES_HOST=") == 1
    assert "DATABASE_URL=postgresql://postgres" not in text  # commented out counts as there
    assert "DATABASE_DRIVER=psycopg\n" in text
    appended = out[out.index("appended .env.example (13 keys):") : out.index("next steps")]
    assert "POSTGRES_PORT" in appended
    assert "POSTGRES_HOST" not in appended
    assert " DATABASE_URL" not in appended
    before = snapshot(tmp_path)
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--driver", "psycopg")
    assert (status, snapshot(tmp_path)) == (0, before)


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi", "--dry-run")
    assert status == 0
    assert out.startswith(f"would scaffold package shop in {tmp_path} (src layout, asyncpg,")
    assert "would be created  src/shop/settings.py" in out
    assert "api/" not in out
    assert list(tmp_path.iterdir()) == []


def test_a_flat_layout_gets_the_package_beside_pyproject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi")
    assert status == 0
    assert "(flat layout, asyncpg, no FastAPI)" in out
    assert (tmp_path / "shop" / "engine.py").is_file()
    ini = (tmp_path / "alembic.ini").read_text()
    assert "script_location = %(here)s/shop/migrations\nprepend_sys_path = .\n" in ini
    assert "--8<--" not in ini


def test_check_shows_what_the_guide_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tmp_path, "--package", "shop", "--no-fastapi")[0] == 0
    engine = tmp_path / "src" / "shop" / "engine.py"
    engine.write_text(engine.read_text().replace("pool_pre_ping=", "pool_pre_ping=False and "))
    (tmp_path / "src" / "shop" / "session.py").unlink()
    item = tmp_path / "src" / "shop" / "models" / "item.py"
    item.write_text(item.read_text() + "# the reader's own change\n")
    env = tmp_path / ".env.example"
    env.write_text(env.read_text().replace("DB_ECHO=false\n", ""))
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi", "--check")
    assert status == 1
    assert "changed   src/shop/engine.py" in out
    assert "    --- src/shop/engine.py (yours)" in out
    assert "    +            pool_pre_ping=settings.db_pool_pre_ping," in out
    assert "missing   src/shop/session.py" in out
    assert "missing   .env.example keys: DB_ECHO" in out
    assert "item.py" not in out  # the reader's own file is not compared
    assert "current   src/shop/settings.py" in out
    assert out.splitlines()[-1] == "3 file(s) differ from the guide's current code"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["afile", "--package", "shop"], "afile: not a directory"),
        (["project", "--package", "Shop"], "--package 'Shop': not a valid package name"),
        (
            ["project", "--package", "My-Shop"],
            "--package 'My-Shop': not a valid package name (lower-case letters, digits and _, a "
            "letter first, at most 20; not a keyword or a standard module); my_shop?\n",
        ),
        (["project", "--package", "class"], "--package 'class': not a valid package name"),
        (["project", "--package", "json"], "--package 'json': not a valid package name"),
        (["project", "--package", "dblayer"], "--package 'dblayer': the project imports"),
        (["project", "--package", "sqlalchemy"], "--package 'sqlalchemy': the project imports"),
        (["project", "--package", "alembic"], "--package 'alembic': the project imports"),
        (["project", "--package", "pydantic"], "--package 'pydantic': the project imports"),
        (["project", "--package", "tests"], "--package 'tests': the project imports"),
        (["project", "--package", "test"], "--package 'test': the project imports"),
        (["project", "--package", "yaml"], "--package 'yaml': Python already imports a module"),
        (["nowhere/shop", "--package", "shop"], "nowhere: no such directory (the parent of"),
        (["project", "--package", "a" * 21], f"--package '{'a' * 21}': not a valid package"),
        (["broken", "--package", "shop"], "broken/pyproject.toml: cannot read it (Expected"),
        (["blocked", "--package", "shop"], "cannot write src/shop/__init__.py: blocked/src is"),
        (["blocked", "--package", "shop", "--dry-run"], "cannot write src/shop/__init__.py:"),
        (["tests_file", "--package", "shop"], "cannot write tests/__init__.py: tests_file/tests"),
    ],
)
def test_a_refused_prerequisite_is_one_line_and_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before anything is written: the directory is as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "project").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pyproject.toml").write_text("[project\n")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "src").write_text("a file where the layout needs a directory")
    (tmp_path / "tests_file").mkdir()
    (tmp_path / "tests_file" / "tests").write_text("a file where tests/ goes")
    before = snapshot(tmp_path)
    status, out, err = run(capsys, *arguments)
    assert (status, out) == (1, "")
    assert err.startswith(f"scaffold: {message}"), err
    assert err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_a_missing_directory_is_made_when_its_parent_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's own command, `python -m dblayer.scaffold ../shop --package shop`."""
    status, out, _ = run(capsys, tmp_path / "shop", "--package", "shop", "--dry-run")
    assert status == 0
    assert "(a directory it would make, src layout" in out.splitlines()[0]
    assert not (tmp_path / "shop").exists()
    status, out, _ = run(capsys, tmp_path / "shop", "--package", "shop")
    assert status == 0
    assert out.splitlines()[0] == (
        f"scaffolded package shop in {tmp_path / 'shop'} "
        "(a new directory, src layout, asyncpg, FastAPI)"
    )
    assert (tmp_path / "shop" / "src" / "shop" / "engine.py").is_file()


def test_the_files_the_code_needs_warn_when_they_are_the_readers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A conftest.py without the plugin, a settings.py and a models/__init__.py lacking what the
    emitted code imports, an alembic.ini with other migrations: each said, with what to do."""
    package = tmp_path / "src" / "shop"
    (package / "models").mkdir(parents=True)
    (package / "settings.py").write_text("class Settings:\n    pass\n\n\ndef get_settings(): ...\n")
    (package / "models" / "__init__.py").write_text("from shop.models.base import Base\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text("import pytest\n")
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    status, out, _ = run(capsys, tmp_path, "--package", "shop")
    assert status == 0
    notes = [line for line in out.splitlines() if line.startswith("warning:")]
    assert notes == [
        "warning: src/shop/models/__init__.py is yours and lacks Item, which src/shop/api/app.py, "
        "src/shop/prestart.py, tests/test_items.py import",
        "warning: src/shop/settings.py is yours and lacks Driver, SERVER_SETTINGS, SettingsError, "
        "which src/shop/engine.py, src/shop/prestart.py, src/shop/testing.py import",
        'warning: tests/conftest.py is yours; add  pytest_plugins = ["shop.testing"]  '
        "(the fixtures session, engine, client come from it)",
        "warning: alembic.ini is yours; its script_location is migrations, but python -m "
        "shop.prestart migrates from src/shop/migrations: set script_location = "
        "%(here)s/src/shop/migrations, or two histories share alembic_version",
    ]
    assert "skipped  tests/__init__.py (your tests/ is not a package)" in out
    assert not (tmp_path / "tests" / "__init__.py").exists()


def test_a_rerun_does_not_bring_back_the_examples_the_reader_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tmp_path, "--package", "shop", "--no-fastapi")[0] == 0
    versions = tmp_path / "src" / "shop" / "migrations" / "versions"
    (versions / "0001_initial_schema.py").unlink()
    (tmp_path / "src" / "shop" / "models" / "item.py").unlink()
    (tmp_path / "tests" / "test_items.py").unlink()
    (tmp_path / "src" / "shop" / "engine.py").unlink()  # the guide's code comes back
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi")
    assert status == 0
    assert "skipped  src/shop/models/item.py (you removed it)" in out
    assert "skipped  src/shop/migrations/versions/0001_initial_schema.py (you removed it)" in out
    assert "skipped  tests/test_items.py (you removed it)" in out
    assert "created  src/shop/engine.py" in out
    assert not (versions / "0001_initial_schema.py").exists()
    assert ".dblayer-scaffold.json" not in out  # it lists engine.py already


def test_check_tells_the_readers_change_from_the_guides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tmp_path, "--package", "shop", "--no-fastapi")[0] == 0
    engine = tmp_path / "src" / "shop" / "engine.py"
    engine.write_text(engine.read_text() + "# mine\n")
    manifest = tmp_path / ".dblayer-scaffold.json"
    record = json.loads(manifest.read_text())
    record["files"]["src/shop/session.py"] = "0" * 64  # as if the guide wrote another one
    session = tmp_path / "src" / "shop" / "session.py"
    record["files"]["src/shop/migrate.py"] = "1" * 64
    manifest.write_text(json.dumps(record))
    session.write_text(session.read_text().replace("\n", "\n\n", 1))
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi", "--check")
    assert status == 1
    assert "changed   src/shop/engine.py (by you)" in out
    assert "changed   src/shop/session.py (by you and by the guide)" in out
    (tmp_path / "src" / "shop" / "migrate.py").write_text("# the old one\n")
    record["files"]["src/shop/migrate.py"] = hashlib.sha256(b"# the old one\n").hexdigest()
    manifest.write_text(json.dumps(record))
    status, out, _ = run(capsys, tmp_path, "--package", "shop", "--no-fastapi", "--check")
    assert "changed   src/shop/migrate.py (by the guide)" in out


def test_a_dangling_symlink_is_not_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "shop"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "conftest.py").symlink_to(tmp_path / "outside.py")
    (project / ".env.example").symlink_to(tmp_path / "outside.env")
    status, out, _ = run(capsys, project, "--package", "shop")
    assert status == 0
    assert "skipped  tests/conftest.py (a symlink, left as it is)" in out
    assert "skipped  .env.example (not a regular file)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]


def test_psycopg_is_the_default_of_a_psycopg_project() -> None:
    """Without `.env` (CI, production) the settings' default is what the project installs."""
    assert scaffold.DRIVERS == DRIVERS
    for driver in DRIVERS:
        (settings,) = [f for f in plan(Options("shop", driver)) if f.path.endswith("settings.py")]
        assert f'    database_driver: Driver = "{driver}"  # DATABASE_DRIVER' in settings.text
    with pytest.raises(ScaffoldError, match="nothing: 0 annotated assignments"):
        set_default("x: int = 1\n", "nothing", "y")


def test_the_layout_follows_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "poetry": '[tool.poetry]\npackages = [{include = "shop"}]\n',
        "poetry_src": '[tool.poetry]\npackages = [{include = "shop", from = "src"}]\n',
        "setuptools": '[tool.setuptools.packages.find]\nwhere = ["."]\n',
        "listed": '[tool.setuptools]\npackages = ["shop"]\n',
        "hatch": '[tool.hatch.build.targets.wheel]\npackages = ["shop"]\n',
        "hatch_src": '[tool.hatch.build.targets.wheel]\npackages = ["src/shop"]\n',
        "none": '[project]\nname = "shop"\n',
    }
    layouts = {}
    for name, pyproject in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "pyproject.toml").write_text(pyproject)
        out = run(capsys, tmp_path / name, "--package", "shop", "--dry-run")[1]
        layouts[name] = out.split("(")[1].split(",")[0]
    assert layouts == {
        "poetry": "flat layout",
        "poetry_src": "src layout",
        "setuptools": "flat layout",
        "listed": "flat layout",
        "hatch": "flat layout",
        "hatch_src": "src layout",
        "none": "src layout",
    }
    out = run(capsys, tmp_path / "none", "--package", "shop", "--layout", "flat", "--dry-run")[1]
    assert "(flat layout," in out
    assert "packaging: the package shop in ./, without tests/" in out


def test_env_example_keys_in_other_spellings_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = "export POSTGRES_HOST=db\npostgres_port=5433\nPOSTGRES_USER = me\n"
    (tmp_path / ".env.example").write_text(env)
    out = run(capsys, tmp_path, "--package", "shop", "--dry-run")[1]
    appended = out[out.index("appended .env.example") : out.index("next steps")]
    for key in ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER"):
        assert key not in appended
    assert "POSTGRES_PASSWORD" in appended
    assert (tmp_path / ".env.example").read_text() == env  # a dry run


def test_the_guide_itself_and_an_installed_copy_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, err = run(capsys, ROOT, "--package", "shop")
    assert (status, err) == (
        1,
        f"scaffold: {ROOT}: the guide's own checkout; name your project's directory\n",
    )
    monkeypatch.setattr(scaffold, "ROOT_FILES", tmp_path)  # as beside site-packages
    status, _, err = run(capsys, tmp_path, "--package", "shop")
    assert status == 1
    assert err.startswith(
        f"scaffold: the guide's alembic.ini and .env.example are not in {tmp_path}"
    )


def test_a_second_run_with_another_driver_says_what_the_first_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, tmp_path, "--package", "shop", "--driver", "psycopg")[0] == 0
    out = run(capsys, tmp_path, "--package", "shop")[1]
    assert "(src layout, psycopg, FastAPI)" in out  # the first run's, without --driver
    out = run(capsys, tmp_path, "--package", "shop", "--driver", "asyncpg")[1]
    assert "warning: the first run wrote the project for psycopg" in out


def test_what_is_only_the_guides_stays_out_of_the_emitted_code() -> None:
    """No pointer to the guide's pages, revisions or Makefile, no settings whose code (read
    replicas, page cursors) is not emitted, nothing named after the guide's package."""
    leftovers = re.compile(
        r"dblayer\.(?!scaffold)|dblayer[_/-]|DBLAYER|docs/|`make |revision 0002|0002, 0003|"
        r"replica_url|for_replica|cursor_secret|CURSOR_SECRET|Makefile",
    )
    for options in (Options("shop"), Options("shop", "psycopg", fastapi=False)):
        for file in plan(options):
            found = leftovers.findall(file.text)
            assert not found, (file.path, found)
        env = "".join(lines for _, lines in scaffold.env_entries("asyncpg"))
        assert not leftovers.findall(env)
    with pytest.raises(ScaffoldError, match="migrate: 0 of 'gone', not one"):
        strip("text", ["gone"], "migrate")


def test_drop_members_takes_fields_methods_validator_arguments_and_keywords() -> None:
    source = (
        "import secrets\n"
        "class S:\n"
        "    a: int = 1\n"
        "    b: int = 2\n"
        "    @validator('a', 'b')\n"
        "    def check(cls, v): return v\n"
        "    def only_b(self): return self.b\n"
        "x = f(\n    a=1,\n    # about b\n    b=secrets.token_hex(),\n)\n"
        "y = f(b=2, a=1)\n"
    )
    assert drop_members(source, ["b", "only_b"]) == (
        "class S:\n"
        "    a: int = 1\n"
        "    @validator('a')\n"
        "    def check(cls, v): return v\n"
        "x = f(\n    a=1,\n)\n"
        "y = f(a=1)\n"
    )


def test_what_the_scaffold_cannot_read_or_write_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest that is not JSON, a directory it may not write, a write failing half-way
    (what was written before it is named), and reader's files it cannot parse."""
    (tmp_path / MANIFEST).write_text("{not json")
    status, _, err = run(capsys, tmp_path, "--package", "shop")
    assert (status, err.split(" (")[0]) == (1, f"scaffold: {tmp_path / MANIFEST}: cannot read it")
    (tmp_path / MANIFEST).unlink()
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda *_: False)  # root may write anywhere
        status, _, err = run(capsys, tmp_path, "--package", "shop")
    assert err.startswith(f"scaffold: cannot write src/shop/__init__.py: {tmp_path} is not writ")
    opened = Path.open

    def failing(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path.name == "engine.py":
            raise PermissionError(13, "Permission denied")
        return opened(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", failing)
        status, _, err = run(capsys, tmp_path, "--package", "shop")
    assert status == 1
    assert err == (
        f"scaffold: cannot write {tmp_path}/src/shop/engine.py: Permission denied; written "
        "before it: src/shop/__init__.py, src/shop/settings.py\n"
    )
    project = tmp_path / "other"
    (project / "src" / "shop" / "models").mkdir(parents=True)
    (project / "src" / "shop" / "settings.py").write_text("def broken(:\n")
    (project / "src" / "shop" / "models" / "__init__.py").write_text("from x import *\n")
    (project / "alembic.ini").write_text("no section\n")
    status, out, _ = run(capsys, project, "--package", "shop")
    notes = [line for line in out.splitlines() if line.startswith("warning:")]
    assert notes[0].startswith("warning: src/shop/models/__init__.py is yours; check it has what ")
    assert notes[1].startswith("warning: src/shop/settings.py is yours; check it has what ")
    assert notes[2].startswith("warning: alembic.ini is yours; its script_location is (unread")
    ini = project / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/src/shop/migrations\n")
    out = run(capsys, project, "--package", "shop")[1]
    assert "alembic.ini is yours" not in out  # its migrations are the package's
    (project / MANIFEST).unlink()  # a project scaffolded before the manifest: who changed it?
    engine = project / "src" / "shop" / "engine.py"
    engine.write_text(engine.read_text() + "# mine\n")
    out = run(capsys, project, "--package", "shop", "--check")[1]
    assert "changed   src/shop/engine.py\n" in out


def test_the_projects_own_installed_package_is_not_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src" / "myshop").mkdir(parents=True)
    (tmp_path / "src" / "myshop" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))  # as `pip install -e .` makes it
    assert run(capsys, tmp_path, "--package", "myshop", "--dry-run")[0] == 0


def test_render_refuses_what_the_guide_no_longer_has() -> None:
    with pytest.raises(ScaffoldError, match="no longer defines nothing_here"):
        definitions("dblayer.session", ["session_scope", "nothing_here"])
    with pytest.raises(ScaffoldError, match="not a module of dblayer: sqlalchemy"):
        canonical_text("sqlalchemy")


def test_drop_removes_the_imports_only_the_dropped_code_used() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path, json as j\n"
        "from x import *\n"
        "from typing import TYPE_CHECKING, Any\n"
        "from a import (\n    b,\n    c,\n)\n"
        "if TYPE_CHECKING:\n    import httpx\n"
        "def gone() -> httpx.Client:\n    return j.loads(c)\n"
        "GONE: int = 1\n"
        "def kept(v: Any) -> str:\n    return os.path.join(b, 'x')\n"
    )
    assert drop(source, ["gone", "GONE"]) == (
        "from __future__ import annotations\n"
        "import os.path\n"
        "from x import *\n"
        "from typing import Any\n"
        "from a import (\n    b,\n)\n"
        "def kept(v: Any) -> str:\n    return os.path.join(b, 'x')\n"
    )


def test_rename_reaches_imports_references_and_module_strings() -> None:
    source = (
        "import dblayer.migrate\n"
        "from dblayer.settings import get_settings\n"
        "_dblayer_run = dblayer.migrate.upgrade\n"
        'SETUP = "dblayer.migrate:upgrade"\n'
        'OTHER = "see dblayer.routing"\n'
        'PREFIX = "dblayer_testing_"\n'
        'VARIABLE = "DBLAYER_PG"\n'
    )
    assert rename(source, "shop", ["migrate", "settings"]) == (
        "import shop.migrate\n"
        "from shop.settings import get_settings\n"
        "_shop_run = shop.migrate.upgrade\n"
        'SETUP = "shop.migrate:upgrade"\n'
        'OTHER = "see dblayer.routing"\n'
        'PREFIX = "shop_testing_"\n'
        'VARIABLE = "SHOP_PG"\n'
    )


def test_python_m_runs_the_command(tmp_path: Path, subprocess_coverage: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dblayer.scaffold", f"{tmp_path}/nowhere/x1", "--package", "x1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"scaffold: {tmp_path}/nowhere: no such directory (the parent of {tmp_path}/nowhere/x1)\n",
    )


# --- The emitted project, run --------------------------------------------------------------

MYPY_CACHE = ROOT / ".cache" / "scaffold-mypy"  # one per variant, warm after the first run
# The reader's pytest plugins off, as on the pages, but pytest-alembic (installed in this
# virtualenv, it crashes the collection of others' tests) on: the emitted pyproject turns it off.
WITH_PYTEST_ALEMBIC = READERS_PYTEST.replace("-p no:pytest_alembic", "")


def _environment(
    project: Path,
    server: Server,
    database_url: str,
    bindir: Path,
    source_root: str = "src",
    unimportable: tuple[str, ...] = ("dblayer",),
) -> dict[str, str]:
    """The reader's shell: their virtualenv's commands first, the run's server for the tests,
    a database of its own for alembic (its URL names no driver, so the settings' default
    decides), and modules that fail on import first on the path: `dblayer`, so any import of
    the guide's package by the emitted code fails the run, and a driver it must not need."""
    shadows = project.parent / "unimportable"
    for module in unimportable:
        (shadows / module).mkdir(parents=True, exist_ok=True)
        (shadows / module / "__init__.py").write_text(
            f'raise ImportError("the scaffolded project imported {module}")\n'
        )
    return {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_DRIVER"},
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{shadows}{os.pathsep}{project / source_root}",
        "TEST_DATABASE_URL": server.admin_url.render_as_string(hide_password=False),
        "DATABASE_URL": database_url,
        "PYTEST_ADDOPTS": WITH_PYTEST_ALEMBIC,
        "NO_COLOR": "1",
    }


def _sh(project: Path, env: dict[str, str], *command: str) -> str:
    result = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=110, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def _check_project(
    project: Path, env: dict[str, str], python: str, package: Path, tests: int, cache: str
) -> None:
    """What the issue asks of the emitted project: migrations, its tests, mypy and ruff."""
    assert "Running upgrade  -> 0001" in _sh(
        project, env, python, "-m", "alembic", "upgrade", "head"
    )
    assert "No new upgrade operations" in _sh(project, env, python, "-m", "alembic", "check")
    # Migrated already: the pre-start waits, finds the head applied and seeds (its seed's
    # idempotence is one of the emitted tests).
    assert "seed: created (2 items)" in _sh(project, env, python, "-m", f"{package.name}.prestart")
    out = _sh(project, env, python, "-m", "pytest", "-q", "-p", "no:randomly")
    assert f"\n{tests} passed in " in out, out
    _sh(project, env, python, "-m", "ruff", "check", ".")
    _sh(project, env, python, "-m", "ruff", "format", "--check", ".")
    mypy = ["-m", "mypy", "--cache-dir", str(MYPY_CACHE / cache), "--strict", str(package)]
    _sh(project, env, python, *mypy)


def _driverless(databases: Databases, database: str) -> str:
    return databases.url(database, "asyncpg").set(drivername="postgresql").render_as_string(False)


READERS_CONFTEST = """import pytest


@pytest.fixture
def answer() -> int:
    return 42
"""


@pytest.mark.parametrize("driver", DRIVERS)  # the quick loop: one of them; FULL=1 runs both
def test_the_emitted_project_passes_its_own_checks(
    tmp_path: Path,
    driver: Driver,
    server: Server,
    databases: Databases,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under asyncpg an empty project (src layout, with the FastAPI part); under psycopg, with
    asyncpg unimportable, an existing flat-layout project with a conftest.py, tests, a
    docker-compose.yml and a .env.example of its own, without FastAPI. In this suite's
    virtualenv (its packages are the emitted project's, and pytest-alembic besides)."""
    project = tmp_path / "shop"
    project.mkdir()
    options = ["--driver", driver]
    if driver == "psycopg":
        (project / "shop").mkdir()
        (project / "shop" / "__init__.py").write_text('"""The shop."""\n')
        (project / "tests").mkdir()
        (project / "tests" / "conftest.py").write_text(READERS_CONFTEST)
        (project / "tests" / "test_mine.py").write_text(
            "def test_mine(answer: int) -> None:\n    assert answer == 42\n"
        )
        (project / "docker-compose.yml").write_text("services: {}\n")
        (project / ".env.example").write_text("POSTGRES_DB=shop\n")
        options.append("--no-fastapi")
    status, out, _ = run(capsys, project, "--package", "shop", *options)
    assert status == 0
    if driver == "psycopg":  # the reader does what the warning says
        (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
        line = warning.split("add  ")[1].split("  (")[0]
        assert line == 'pytest_plugins = ["shop.testing"]'
        with (project / "tests" / "conftest.py").open("a") as conftest:
            conftest.write(f"\n\n{line}\n")
    source_root = "src" if driver == "asyncpg" else "."
    unimportable = ("dblayer",) if driver == "asyncpg" else ("dblayer", "asyncpg")
    database = databases.clone(empty=True)
    try:
        url = _driverless(databases, database)
        bindir = Path(sys.executable).parent
        env = _environment(project, server, url, bindir, source_root, unimportable)
        package = Path(source_root, "shop")
        # 2 of the items, 2 of the migrations, and the API's (asyncpg) or the reader's (psycopg)
        _check_project(project, env, sys.executable, package, 5, driver)
    finally:
        databases.drop(database)


def _fresh_virtualenv(tmp_path: Path) -> tuple[Path, str]:
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    return environment, str(environment / "bin" / "python")


@pytest.mark.slow
def test_the_emitted_project_installs_into_a_fresh_virtualenv(
    tmp_path: Path, server: Server, databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a reader does it: a new virtualenv, `pip install -e '.[test]'` from the package index,
    nothing of this suite's installed, and its tests on the embedded PostgreSQL they start
    (no TEST_DATABASE_URL)."""
    project = tmp_path / "shop"
    assert run(capsys, project, "--package", "shop")[0] == 0
    environment, python = _fresh_virtualenv(tmp_path)
    install = [python, "-m", "pip", "install", "--quiet", "-e", ".[test]"]
    subprocess.run(install, cwd=project, check=True, timeout=600)
    database = databases.clone(empty=True)
    try:
        env = _environment(project, server, _driverless(databases, database), environment / "bin")
        env.pop("PYTEST_ADDOPTS")
        env.pop("TEST_DATABASE_URL")
        _check_project(project, env, python, Path("src", "shop"), 5, "fresh")
    finally:
        databases.drop(database)


@pytest.mark.slow
def test_the_flat_layout_builds_a_wheel_of_the_package_only(
    tmp_path: Path, server: Server, databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flat layout built into a wheel holds the package and no top-level `tests`; installed
    (not editable) into a fresh virtualenv, the project passes its checks."""
    project = tmp_path / "shop"
    assert run(capsys, project, "--package", "shop", "--layout", "flat")[0] == 0
    environment, python = _fresh_virtualenv(tmp_path)
    build = [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."]
    subprocess.run(build, cwd=project, check=True, timeout=600)
    (wheel,) = tmp_path.glob("shop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert top == {"shop", "shop-0.1.0.dist-info"}
    install = [python, "-m", "pip", "install", "--quiet", f"{wheel}[test]"]
    subprocess.run(install, cwd=tmp_path, check=True, timeout=600)
    database = databases.clone(empty=True)
    try:
        env = _environment(project, server, _driverless(databases, database), environment / "bin")
        env["PYTHONPATH"] = env["PYTHONPATH"].split(os.pathsep)[0]  # the installed package
        env.pop("PYTEST_ADDOPTS")
        _check_project(project, env, python, Path("shop"), 5, "flat")
    finally:
        databases.drop(database)
