"""`python -m dblayer.scaffold`: what it writes, what it leaves, and that the project it writes
passes its own checks (alembic, its tests on this run's server, mypy --strict, ruff)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from dblayer.scaffold import Options, main, plan
from dblayer.scaffold.render import ScaffoldError, canonical_text, definitions, drop, rename
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
        (["missing", "--package", "shop"], "missing: no such directory"),
        (["afile", "--package", "shop"], "afile: not a directory"),
        (["project", "--package", "Shop"], "--package 'Shop': not a valid package name"),
        (["project", "--package", "class"], "--package 'class': not a valid package name"),
        (["project", "--package", "json"], "--package 'json': not a valid package name"),
        (["project", "--package", "dblayer"], "--package 'dblayer': not a valid package name"),
        (["project", "--package", "a" * 21], f"--package '{'a' * 21}': not a valid package"),
        (["broken", "--package", "shop"], "broken/pyproject.toml: cannot read it (Expected"),
        (["blocked", "--package", "shop"], "cannot write blocked/src/shop/__init__.py:"),
    ],
)
def test_a_refused_prerequisite_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "project").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pyproject.toml").write_text("[project\n")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "src").write_text("a file where the layout needs a directory")
    status, out, err = run(capsys, *arguments)
    assert (status, out) == (1, "")
    assert err.startswith(f"scaffold: {message}"), err
    assert err.count("\n") == 1


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
        "_dblayer_run = shop.migrate.upgrade\n"
        'SETUP = "shop.migrate:upgrade"\n'
        'OTHER = "see dblayer.routing"\n'
        'PREFIX = "shop_testing_"\n'
        'VARIABLE = "SHOP_PG"\n'
    )


def test_python_m_runs_the_command(tmp_path: Path, subprocess_coverage: None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dblayer.scaffold", str(tmp_path / "nowhere"), "--package", "x1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"scaffold: {tmp_path}/nowhere: no such directory\n",
    )


# --- The emitted project, run --------------------------------------------------------------

MYPY_CACHE = ROOT / ".cache" / "scaffold-mypy"  # warm after the first run (git-ignored)


def _environment(
    project: Path, server: Server, database_url: str, driver: Driver, bindir: Path
) -> dict[str, str]:
    """The reader's shell: their virtualenv's commands first, the run's server for the tests,
    a database of its own for alembic, and a `dblayer` that fails on import first on the path,
    so any import of the guide's package by the emitted code fails the run."""
    shadow = project.parent / "no-dblayer" / "dblayer"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text(
        'raise ImportError("the scaffolded code imported dblayer")\n'
    )
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{shadow.parent}{os.pathsep}{project / 'src'}",
        "TEST_DATABASE_URL": server.admin_url.render_as_string(hide_password=False),
        "DATABASE_URL": database_url,
        "DATABASE_DRIVER": driver,
        "PYTEST_ADDOPTS": READERS_PYTEST,
        "NO_COLOR": "1",
    }


def _sh(project: Path, env: dict[str, str], *command: str) -> str:
    result = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=110, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def _check_project(project: Path, env: dict[str, str], python: str, package: str) -> None:
    """What the issue asks of the emitted project: migrations, its tests, mypy and ruff."""
    assert "Running upgrade  -> 0001" in _sh(
        project, env, python, "-m", "alembic", "upgrade", "head"
    )
    assert "No new upgrade operations" in _sh(project, env, python, "-m", "alembic", "check")
    # Migrated already: the pre-start waits, finds the head applied and seeds (its seed's
    # idempotence is one of the emitted tests).
    assert "seed: created (2 items)" in _sh(project, env, python, "-m", f"{package}.prestart")
    assert " passed" in _sh(project, env, python, "-m", "pytest", "-q", "-p", "no:randomly")
    _sh(project, env, python, "-m", "ruff", "check", ".")
    _sh(project, env, python, "-m", "ruff", "format", "--check", ".")
    cache = ["--cache-dir", str(MYPY_CACHE)]
    _sh(project, env, python, "-m", "mypy", *cache, "--strict", f"src/{package}")


@pytest.mark.both_drivers
@pytest.mark.parametrize("driver", DRIVERS)
def test_the_emitted_project_passes_its_own_checks(
    tmp_path: Path,
    driver: Driver,
    server: Server,
    databases: Databases,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under asyncpg an empty project with the FastAPI part; under psycopg one that has files
    already, without it. In this suite's virtualenv (its packages are the emitted project's)."""
    project = tmp_path / "shop"
    (project / "src" / "shop").mkdir(parents=True)
    options = ["--driver", driver]
    if driver == "psycopg":
        (project / "src" / "shop" / "__init__.py").write_text('"""The shop."""\n')
        (project / "docker-compose.yml").write_text("services: {}\n")
        (project / ".env.example").write_text("POSTGRES_DB=shop\n")
        options.append("--no-fastapi")
    assert run(capsys, project, "--package", "shop", *options)[0] == 0
    database = databases.clone(empty=True)
    try:
        url = databases.url(database, driver).render_as_string(hide_password=False)
        env = _environment(project, server, url, driver, Path(sys.executable).parent)
        _check_project(project, env, sys.executable, "shop")
    finally:
        databases.drop(database)


@pytest.mark.slow
def test_the_emitted_project_installs_into_a_fresh_virtualenv(
    tmp_path: Path, server: Server, databases: Databases, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a reader does it: a new virtualenv, `pip install -e '.[test]'` from the package index,
    nothing of this suite's installed, and its tests on the embedded PostgreSQL they start
    (no TEST_DATABASE_URL)."""
    project = tmp_path / "shop"
    project.mkdir()
    assert run(capsys, project, "--package", "shop")[0] == 0
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "-e", ".[test]"]
    subprocess.run(install, cwd=project, check=True, timeout=600)
    database = databases.clone(empty=True)
    try:
        url = databases.url(database, "asyncpg").render_as_string(hide_password=False)
        env = _environment(project, server, url, "asyncpg", environment / "bin")
        env.pop("PYTEST_ADDOPTS")
        env.pop("TEST_DATABASE_URL")
        _check_project(project, env, python, "shop")
    finally:
        databases.drop(database)
