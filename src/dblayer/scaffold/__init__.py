"""`python -m dblayer.scaffold TARGET --package NAME`: the guide's database layer in your project.

What it writes is the canonical code the pages include and the tests run (`src/dblayer/`), with the
package renamed by libcst (see `render`): settings, engine, sessions, models (base, mixins and an
example model), Alembic (`alembic.ini`, `env.py`, `script.py.mako`, an initial revision), a
pre-start script with a seed, the embedded server and pytest plugin the tests run on, and (unless
`--no-fastapi`) the FastAPI session dependency and lifespan, with tests of its own. What is only
the guide's (users and tasks, replicas, roles, PgBouncer) stays out. The emitted code never
imports `dblayer`: it is the reader's.

It never overwrites: a file that exists is reported and left as it is, `.env.example` only gets
the keys it lacks, so a second run changes nothing. `--check` compares the files that came from
the guide's code with what the guide has now, a unified diff per file.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import difflib
import hashlib
import importlib.util
import json
import keyword
import os
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from dblayer.scaffold.render import (
    SOURCE,
    ScaffoldError,
    canonical_text,
    drop,
    drop_members,
    include,
    rename,
    set_default,
    strip,
)

if TYPE_CHECKING:
    from dblayer.settings import Driver

# dblayer.settings' DRIVERS (a test holds them equal), without importing SQLAlchemy and pydantic
# at start-up: the command is run more often than it renders.
DRIVERS: tuple[Driver, ...] = ("asyncpg", "psycopg")

__all__ = ["Emitted", "Outcome", "ScaffoldError", "apply", "check", "main", "plan"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
ROOT_FILES = SOURCE.parent.parent  # the checkout: alembic.ini, docker-compose.yml, .env.example
_PACKAGE = re.compile(r"[a-z][a-z0-9_]{0,19}")  # the test plugin's database prefix must fit 30
# The testing plugin's FastAPI fixtures, left out with --no-fastapi.
_FASTAPI_FIXTURES = ("app", "session_dependency", "_depends_on", "client")
# `KEY=v`, `# KEY=v`, `export KEY=v`, `key = v`: a key the reader's file has, set or not.
# What is only the guide's, taken out of the code it emits: the settings of read replicas and
# page cursors (their code, routing and pagination, stays in the guide), and the comments that
# point at the guide's own pages, revisions and Makefile.
_GUIDE_ONLY_MEMBERS = {
    "settings": ("database_replica_url", "for_replica", "db_cursor_secret", "_long_cursor_secret"),
    "testing": ("db_cursor_secret",),
}
_GUIDE_ONLY_PHRASES = {
    "settings": (
        " (docs/scaling-pgbouncer.md)",
        " (see 0002, 0003)",
    ),
    "migrate": (" (revision 0002 reads `lock_timeout`)",),
    "binaries": (" (`make test PG=17` sets it)", " (the Makefile's `.cache/postgres`)"),
    "embedded": ("by `make app` and ",),
    ".env.example": (" (`python -m dblayer.roles` makes both)",),
}
_GUIDE_ONLY_KEYS = ("DB_CURSOR_SECRET",)
_ENV_KEY = re.compile(r"^\s*#?\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
MANIFEST = ".dblayer-scaffold.json"  # what the scaffold wrote: paths, hashes, options
# What the emitted project imports or installs, and names pytest gives a meaning: a package of
# that name would shadow it (or be shadowed).
_TAKEN = frozenset(
    {
        "dblayer", "sqlalchemy", "asyncpg", "psycopg", "psycopg_binary", "pydantic",
        "pydantic_core", "pydantic_settings", "uuid_utils", "alembic", "tenacity", "fastapi",
        "starlette", "uvicorn", "httpx", "pytest", "pytest_asyncio", "pgserver", "mypy", "ruff",
        "setuptools", "test", "tests", "conftest",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Emitted:
    """One file the scaffold writes: its path in the project, its text, and whether it is the
    guide's code (compared by `--check`) or a starting point that is the reader's to change."""

    path: str
    text: str
    canonical: bool


@dataclass(frozen=True)
class Outcome:
    path: str
    action: str  # created, skipped, appended
    detail: str = ""


@dataclass(frozen=True)
class Options:
    package: str
    driver: Driver = "asyncpg"
    fastapi: bool = True
    source_root: str = "src"  # "src" (src layout) or "." (the package beside pyproject.toml)


def _modules(fastapi: bool) -> list[str]:
    """The emitted modules, below the package, that strings may name (`"dblayer.migrate:…"`)."""
    modules = [
        "settings",
        "engine",
        "session",
        "models",
        "migrate",
        "migrations",
        "prestart",
        "embedded",
        "binaries",
        "testing",
    ]
    return [*modules, "api"] if fastapi else modules


def _template(name: str) -> str:
    return (TEMPLATES / name).read_text("utf-8")


@cache
def plan(options: Options) -> tuple[Emitted, ...]:
    """Every file of the scaffold, rendered from the guide's current code (once per process:
    the guide's files do not change while it runs)."""
    package, modules = options.package, _modules(options.fastapi)
    root = "" if options.source_root == "." else f"{options.source_root}/"
    base = f"{root}{package}"

    def python(source: str) -> str:
        return rename(source, package, modules)

    def canonical(module: str, *, without: tuple[str, ...] = ()) -> str:
        text = strip(
            canonical_text(f"dblayer.{module}"), _GUIDE_ONLY_PHRASES.get(module, ()), module
        )
        members = _GUIDE_ONLY_MEMBERS.get(module)
        text = drop_members(text, members) if members else text
        return python(drop(text, without) if without else text)

    def template(name: str) -> str:
        return python(include(_template(name)))

    files = [
        Emitted(f"{base}/__init__.py", template("package_init.py.tmpl"), canonical=False),
        Emitted(
            f"{base}/settings.py", _settings(canonical("settings"), options.driver), canonical=True
        ),
        Emitted(f"{base}/engine.py", canonical("engine"), canonical=True),
        Emitted(f"{base}/session.py", canonical("session"), canonical=True),
        Emitted(f"{base}/models/__init__.py", template("models_init.py.tmpl"), canonical=False),
        Emitted(f"{base}/models/base.py", canonical("models.base"), canonical=True),
        Emitted(f"{base}/models/mixins.py", canonical("models.mixins"), canonical=True),
        Emitted(f"{base}/models/item.py", template("item.py.tmpl"), canonical=False),
        Emitted(f"{base}/migrate.py", canonical("migrate"), canonical=True),
        Emitted(f"{base}/migrations/__init__.py", "", canonical=True),
        Emitted(f"{base}/migrations/env.py", canonical("migrations.env"), canonical=True),
        Emitted(
            f"{base}/migrations/script.py.mako",
            (SOURCE / "migrations" / "script.py.mako").read_text("utf-8"),
            canonical=True,
        ),
        Emitted(
            f"{base}/migrations/versions/0001_initial_schema.py",
            template("0001_initial_schema.py.tmpl"),
            canonical=False,
        ),
        Emitted(f"{base}/prestart.py", template("prestart.py.tmpl"), canonical=True),
        Emitted(f"{base}/binaries.py", canonical("binaries"), canonical=True),
        Emitted(f"{base}/embedded.py", canonical("embedded"), canonical=True),
        Emitted(
            f"{base}/testing.py",
            canonical("testing", without=() if options.fastapi else _FASTAPI_FIXTURES),
            canonical=True,
        ),
    ]
    if options.fastapi:
        files += [
            Emitted(f"{base}/api/__init__.py", template("api_init.py.tmpl"), canonical=False),
            Emitted(f"{base}/api/deps.py", template("deps.py.tmpl"), canonical=True),
            Emitted(f"{base}/api/app.py", template("app.py.tmpl"), canonical=False),
        ]
    files += [
        Emitted("alembic.ini", _alembic_ini(options), canonical=True),
        Emitted("docker-compose.yml", (ROOT_FILES / "docker-compose.yml").read_text("utf-8"), True),
        Emitted("tests/__init__.py", "", canonical=False),
        Emitted("tests/conftest.py", template("conftest.py.tmpl"), canonical=False),
        Emitted("tests/test_items.py", template("test_items.py.tmpl"), canonical=False),
        Emitted("tests/test_migrations.py", template("test_migrations.py.tmpl"), canonical=False),
    ]
    if options.fastapi:
        files.append(Emitted("tests/test_api.py", template("test_api.py.tmpl"), canonical=False))
    files.append(Emitted("pyproject.toml", _pyproject(options), canonical=False))
    return tuple(files)


def _settings(text: str, driver: Driver) -> str:
    """The guide's settings; with `--driver psycopg` that is the default too, so a project
    without `.env` (CI, production) never needs asyncpg, which it does not install."""
    return text if driver == "asyncpg" else set_default(text, "database_driver", driver)


def _alembic_ini(options: Options) -> str:
    """The guide's alembic.ini with the project's paths (an ini file: its two keys are set)."""
    text = re.sub(
        r"^[ \t]*# --8<-- \[(?:start|end):\w+\]\n",
        "",
        (ROOT_FILES / "alembic.ini").read_text("utf-8"),
        flags=re.M,
    )
    root = "" if options.source_root == "." else f"{options.source_root}/"
    text, located = re.subn(
        r"^script_location = .*$",
        f"script_location = %(here)s/{root}{options.package}/migrations",
        text,
        flags=re.M,
    )
    text, prepended = re.subn(
        r"^prepend_sys_path = .*$", f"prepend_sys_path = {options.source_root}", text, flags=re.M
    )
    if (located, prepended) != (1, 1):  # pragma: no cover - the guide's own file changed shape
        raise ScaffoldError("alembic.ini: script_location or prepend_sys_path not found")
    return text


def dependencies(options: Options) -> tuple[list[str], list[str]]:
    """What the emitted code imports: (the package's, its tests')."""
    runtime = [
        "sqlalchemy[asyncio]>=2.1.0",
        "asyncpg>=0.30" if options.driver == "asyncpg" else "psycopg[binary]>=3.2",
        "pydantic>=2.9",
        "pydantic-settings>=2.6",
        "uuid-utils>=0.9",
        "alembic>=1.14",
        "tenacity>=9.0",
    ]
    if options.fastapi:
        runtime += ["fastapi>=0.121", "uvicorn>=0.30"]
    test = ["pytest>=8.3", "pytest-asyncio>=1.0", "pgserver>=0.1.4", "mypy>=1.13", "ruff>=0.8"]
    if options.driver == "asyncpg":
        test.insert(0, "psycopg[binary]>=3.2")  # the test plugin's admin connection
    if options.fastapi:
        test.append("httpx>=0.28")
    return runtime, test


def _pyproject(options: Options) -> str:
    runtime, test = dependencies(options)
    return Template(_template("pyproject.toml.tmpl")).substitute(
        package=options.package,
        source_root=options.source_root,
        dependencies="".join(f'    "{d}",\n' for d in runtime),
        test_dependencies="".join(f'    "{d}",\n' for d in test),
    )


def env_entries(driver: Driver, package: str = "app") -> list[tuple[str, str]]:
    """The guide's `.env.example` as (key, its lines: the comments above it and the line), with
    the project's driver, and its package's name as the database's (the guide's is `app`)."""
    entries: list[tuple[str, str]] = []
    pending: list[str] = []
    guide = (ROOT_FILES / ".env.example").read_text("utf-8")
    text = strip(guide, _GUIDE_ONLY_PHRASES[".env.example"], ".env.example")
    for line in text.splitlines(keepends=True):
        match = _ENV_KEY.match(line)
        if match is None:
            pending.append(line)
            continue
        if match.group(1) in _GUIDE_ONLY_KEYS:
            pending = []
            continue
        if match.group(1) == "DATABASE_DRIVER":
            line = f"DATABASE_DRIVER={driver}\n"
        elif match.group(1) == "POSTGRES_DB":
            line = f"POSTGRES_DB={package}\n"
        else:  # the URLs' database, in the commented-out examples
            line = line.replace(":5432/app\n", f":5432/{package}\n")
        entries.append((match.group(1), "".join([*pending, line])))
        pending = []
    return entries


def _env_keys(text: str) -> set[str]:
    """The keys a `.env.example` mentions, set or commented out (either way the reader knows),
    upper-cased: the settings read them case-insensitively."""
    return {m.group(1).upper() for line in text.splitlines() if (m := _ENV_KEY.match(line))}


def _missing_env(target: Path, options: Options) -> tuple[str | None, list[tuple[str, str]]]:
    path = target / ".env.example"
    existing = path.read_text("utf-8") if path.is_file() else None
    known = _env_keys(existing or "")
    entries = env_entries(options.driver, options.package)
    return existing, [(key, lines) for key, lines in entries if key not in known]


def _refused_name(target: Path, package: str) -> str | None:
    """Why `package` cannot be the project's package, or None."""
    if (
        not _PACKAGE.fullmatch(package)
        or keyword.iskeyword(package)
        or package in sys.stdlib_module_names
    ):
        suggestion = re.sub(r"[^a-z0-9_]", "_", package.lower())
        valid = suggestion != package and _PACKAGE.fullmatch(suggestion)
        hint = f"; {suggestion}?" if valid and _refused_name(target, suggestion) is None else ""
        return (
            "not a valid package name (lower-case letters, digits and _, a letter first, "
            f"at most 20; not a keyword or a standard module){hint}"
        )
    if package in _TAKEN:
        return "the project imports or installs a module of that name, or pytest owns it"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # pragma: no cover - a broken module of that name
        spec = None
    if spec is None or spec.origin is None:  # a namespace package (a bare directory) shadows none
        return None
    if Path(spec.origin).resolve().is_relative_to(target.resolve()):
        return None  # the project's own package, installed
    return f"Python already imports a module of that name from {spec.origin}"
    return None


def _layout(target: Path, package: str, pyproject: dict[str, object]) -> str:
    """Where the package goes: where it is; else where pyproject.toml's packaging looks for
    packages (setuptools' `where`, poetry's `packages`, hatch's wheel packages); else src/."""
    if (target / package).is_dir() and not (target / "src" / package).is_dir():
        return "."
    if (target / "src" / package).is_dir():
        return "src"

    def table(*keys: str) -> dict[str, Any]:
        node: object = pyproject
        for key in keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    hints: list[object] = list(table("tool", "setuptools", "packages", "find").get("where", []))
    listed = table("tool", "setuptools").get("packages")
    if isinstance(listed, list):
        hints.append("." if package in listed else "src")
    poetry = table("tool", "poetry").get("packages", [])
    hints += [entry.get("from", ".") for entry in poetry if isinstance(entry, dict)]
    wheel = table("tool", "hatch", "build", "targets", "wheel").get("packages", [])
    hints += ["src" if str(p).startswith("src/") else "." for p in wheel]
    return "." if hints and all(str(h).strip("./") == "" for h in hints) else "src"


def _checked_options(
    target: Path, package: str, driver: Driver, fastapi: bool, layout: str | None = None
) -> Options:
    """The prerequisites, each refused in one line: a directory (made when only it is missing),
    a package name that shadows nothing, a readable pyproject.toml, a checkout of the guide."""
    if not (ROOT_FILES / "alembic.ini").is_file() or not (ROOT_FILES / ".env.example").is_file():
        raise ScaffoldError(
            f"the guide's alembic.ini and .env.example are not in {ROOT_FILES}: run it from a "
            "checkout of the guide (pip install -e .), not an installed copy"
        )
    if target.exists() and not target.is_dir():
        raise ScaffoldError(f"{target}: not a directory")
    if not target.exists() and not target.absolute().parent.is_dir():
        raise ScaffoldError(f"{target.parent}: no such directory (the parent of {target})")
    if target.exists() and target.resolve() == ROOT_FILES.resolve():
        raise ScaffoldError(f"{target}: the guide's own checkout; name your project's directory")
    refused = _refused_name(target, package)
    if refused:
        raise ScaffoldError(f"--package {package!r}: {refused}")
    pyproject = target / "pyproject.toml"
    config: dict[str, object] = {}
    if pyproject.exists():
        try:
            with pyproject.open("rb") as file:
                config = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ScaffoldError(f"{pyproject}: cannot read it ({exc})") from None
    source_root = {"src": "src", "flat": "."}.get(layout or "") or _layout(target, package, config)
    return Options(package, driver, fastapi, source_root)


def _manifest(target: Path) -> dict[str, object]:
    path = target / MANIFEST
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ScaffoldError(f"{path}: cannot read it ({exc})") from None
    return loaded if isinstance(loaded, dict) else {}


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _emitted_hashes(manifest: dict[str, object]) -> dict[str, str]:
    files = manifest.get("files")
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _blocked(target: Path, relative: str) -> str | None:
    """Why `relative` cannot be created under `target` (checked for every file before the first
    is written), or None."""
    path = target / relative
    for parent in [*reversed(path.relative_to(target).parents)][1:]:
        here = target / parent
        if os.path.lexists(here) and not here.is_dir():
            return f"{here} is not a directory"
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def apply(target: Path, options: Options, *, dry_run: bool = False) -> list[Outcome]:
    """Write what is missing; never overwrite, never write through a symlink, and never bring
    back an example file the reader removed (the manifest says it was written once). Every path
    is checked before the first file is written. The outcomes, in the order of `plan`."""
    manifest = _manifest(target)
    emitted = _emitted_hashes(manifest)
    outcomes: list[Outcome] = []
    create: list[Emitted] = []
    tests_of_theirs = (target / "tests").is_dir() and not (
        target / "tests" / "__init__.py"
    ).exists()
    for file in plan(options):
        path = target / file.path
        if os.path.lexists(path):
            detail = "a symlink, left as it is" if path.is_symlink() else "exists"
            outcomes.append(Outcome(file.path, "skipped", detail))
        elif file.path in emitted and not file.canonical:
            outcomes.append(Outcome(file.path, "skipped", "you removed it"))
        elif file.path == "tests/__init__.py" and tests_of_theirs and file.path not in emitted:
            outcomes.append(Outcome(file.path, "skipped", "your tests/ is not a package"))
        else:
            outcomes.append(Outcome(file.path, "created"))
            create.append(file)
    env_path = target / ".env.example"
    env_ok = not os.path.lexists(env_path) or (env_path.is_file() and not env_path.is_symlink())
    for relative in [f.path for f in create] + [".env.example", MANIFEST]:
        reason = _blocked(target, relative) if target.exists() else None
        if reason:
            raise ScaffoldError(f"cannot write {relative}: {reason} (nothing was written)")
    env_outcome, env_text = _env_outcome(target, options, env_ok)
    outcomes.append(env_outcome)
    hashes = {**emitted, **{f.path: _hash(f.text) for f in create}}
    record = {
        "package": options.package,
        "driver": manifest.get("driver", options.driver),
        "source_root": options.source_root,
        "files": dict(sorted(hashes.items())),
    }
    record_text = json.dumps(record, indent=1) + "\n"
    if manifest != record:
        action = "updated" if manifest else "created"
        outcomes.append(
            Outcome(MANIFEST, action, "what the scaffold wrote, for reruns and --check")
        )
    if dry_run:
        return outcomes
    written: list[str] = []
    try:
        for file in create:
            _write(target / file.path, file.text)
            written.append(file.path)
        if env_text is not None:
            _write(env_path, env_text, new=env_outcome.action == "created")
        if manifest != record:
            _write(target / MANIFEST, record_text, new=not manifest)
    except ScaffoldError as error:
        done = f"; written before it: {', '.join(written)}" if written else "; nothing written"
        raise ScaffoldError(f"{error}{done}") from None
    return outcomes


def _env_outcome(target: Path, options: Options, usable: bool) -> tuple[Outcome, str | None]:
    if not usable:
        return Outcome(".env.example", "skipped", "not a regular file"), None
    existing, missing = _missing_env(target, options)
    if existing is None:
        return Outcome(".env.example", "created"), "".join(lines for _, lines in missing)
    if not missing:
        return Outcome(".env.example", "skipped", "has every key"), None
    separator = "" if existing.endswith("\n") or not existing else "\n"
    added = "# The database layer's settings (python -m dblayer.scaffold):\n"
    text = existing + separator + added + "".join(lines for _, lines in missing)
    return Outcome(".env.example", "appended", ", ".join(k for k, _ in missing)), text


def _write(path: Path, text: str, *, new: bool = True) -> None:
    """Create `path` (O_EXCL: never over a file or through a symlink that appeared), or rewrite
    the reader's `.env.example` with lines appended."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x" if new else "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        raise ScaffoldError(f"cannot write {path}: {exc.strerror or exc}") from None


def _defined(source: str) -> set[str] | None:
    """The top-level names a module defines or imports; None when it cannot say (a star
    import, a syntax error)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {
                n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)
            }
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any(alias.name == "*" for alias in node.names):
                return None
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def warnings(target: Path, options: Options, outcomes: list[Outcome]) -> list[str]:
    """What a file of the reader's, left as it is, breaks in the code written beside it: the
    names imported from it that it lacks, the test plugin a conftest.py does not load, an
    alembic.ini whose migrations are not the package's."""
    by_path = {file.path: file for file in plan(options)}
    skipped = {o.path for o in outcomes if o.action == "skipped" and o.path in by_path}
    theirs = {
        p
        for p in skipped
        if (target / p).is_file() and (target / p).read_text("utf-8") != by_path[p].text
    }
    root = "" if options.source_root == "." else f"{options.source_root}/"
    lines: list[str] = []
    needs: dict[str, dict[str, set[str]]] = {}  # their module's path -> importer -> names
    for file in by_path.values():
        if (
            not file.path.endswith(".py")
            or file.path in theirs
            or file.path not in {o.path for o in outcomes}
        ):
            continue
        for node in ast.walk(ast.parse(file.text)):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == options.package
            ):
                module = root + node.module.replace(".", "/")
                for candidate in (f"{module}.py", f"{module}/__init__.py"):
                    if candidate in theirs:
                        names = {alias.name for alias in node.names}
                        needs.setdefault(candidate, {}).setdefault(file.path, set()).update(names)
    for path, importers in sorted(needs.items()):
        defined = _defined((target / path).read_text("utf-8"))
        if defined is None:
            lines.append(
                f"warning: {path} is yours; check it has what {', '.join(sorted(importers))} import"
            )
            continue
        lacking = sorted(set().union(*importers.values()) - defined)
        if lacking:
            users = sorted(i for i, names in importers.items() if names - defined)
            lines.append(
                f"warning: {path} is yours and lacks {', '.join(lacking)}, "
                f"which {', '.join(users)} import{'s' if len(users) == 1 else ''}"
            )
    conftest = target / "tests" / "conftest.py"
    if "tests/conftest.py" in theirs and f"{options.package}.testing" not in conftest.read_text(
        "utf-8"
    ):
        lines.append(
            "warning: tests/conftest.py is yours; add  "
            f'pytest_plugins = ["{options.package}.testing"]'
            "  (the fixtures session, engine, client come from it)"
        )
    if "alembic.ini" in theirs:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(target / "alembic.ini", encoding="utf-8")
            location = parser.get("alembic", "script_location", fallback="")
        except configparser.Error:
            location = "(unreadable)"
        wanted = f"{root}{options.package}/migrations"
        given = location.replace("%(here)s/", "").removeprefix("./")
        if given != wanted:
            lines.append(
                "warning: alembic.ini is yours; its script_location is "
                f"{location or '(none)'}, but "
                f"python -m {options.package}.prestart migrates from {wanted}: set "
                f"script_location = %(here)s/{wanted}, or two histories share alembic_version"
            )
    return lines


def check(target: Path, options: Options) -> tuple[list[str], int]:
    """Lines to print, and how many of the guide's files differ from the project's copy (or are
    missing). The reader's own starting points (the example model, the tests) are not compared."""
    lines: list[str] = []
    changed = 0
    emitted = _emitted_hashes(_manifest(target))
    for file in plan(options):
        if not file.canonical:
            continue
        path = target / file.path
        if not path.is_file():
            lines.append(f"missing   {file.path}")
            changed += 1
            continue
        yours = path.read_text("utf-8")
        if yours == file.text:
            lines.append(f"current   {file.path}")
            continue
        changed += 1
        lines.append(f"changed   {file.path}{_by_whom(emitted.get(file.path), yours, file.text)}")
        lines += _diff(yours, file.text, file.path)
    _, missing = _missing_env(target, options)
    if missing:
        changed += 1
        lines.append(f"missing   .env.example keys: {', '.join(key for key, _ in missing)}")
    return lines, changed


def _by_whom(written: str | None, yours: str, guide: str) -> str:
    """Who changed a file since the scaffold wrote it, from the manifest's hash of what it wrote."""
    if written is None:
        return ""
    if written == _hash(guide):
        return " (by you)"
    if written == _hash(yours):
        return " (by the guide)"
    return " (by you and by the guide)"


def _diff(yours: str, guide: str, path: str) -> Iterator[str]:
    diff = difflib.unified_diff(
        yours.splitlines(), guide.splitlines(), f"{path} (yours)", f"{path} (guide)", lineterm=""
    )
    return (f"    {line}" for line in diff)


def next_steps(target: Path, options: Options) -> list[str]:
    """What to do next; for a `pyproject.toml` of the reader's own, what it needs."""
    steps = [f"next steps (in {target}):"]
    pyproject = target / "pyproject.toml"
    if pyproject.is_file() and pyproject.read_text("utf-8") != _pyproject(options):
        runtime, test = dependencies(options)
        steps += [
            "  your pyproject.toml was left as it is; it needs",
            *_wrapped("dependencies: ", runtime),
            *_wrapped("a test extra: ", test),
            *_wrapped(
                "[tool.pytest.ini_options] ",
                [
                    f'pythonpath = ["{options.source_root}"]',
                    'asyncio_mode = "auto"',
                    'asyncio_default_fixture_loop_scope = "function"',
                    'addopts = ["-p", "no:pytest_alembic"]',
                ],
            ),
            *_wrapped(
                "packaging: ",
                [f"the package {options.package} in {options.source_root}/, without tests/"],
            ),
        ]
    steps += [
        "  python -m pip install -e '.[test]'",
        "  cp .env.example .env && docker compose up -d --wait   # a database for development",
        f"  python -m {options.package}.prestart   # wait, migrate (alembic upgrade head), seed",
        "  pytest   # on TEST_DATABASE_URL, else an embedded PostgreSQL",
    ]
    return steps


def _wrapped(label: str, items: list[str], indent: str = "    ", hang: str = "  ") -> list[str]:
    """`label a, b, c` in lines of at most 100 characters, as a terminal shows them."""
    return textwrap.wrap(
        label + ", ".join(items),
        width=100,
        initial_indent=indent,
        subsequent_indent=indent + hang,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dblayer.scaffold", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "target", type=Path, help="the project's directory (made if only it is missing)"
    )
    parser.add_argument("--package", required=True, help="the package to write (e.g. shop)")
    parser.add_argument(
        "--driver",
        choices=DRIVERS,
        help="the settings' default driver and the dependency to install (asyncpg; on a "
        "rerun, the first run's)",
    )
    parser.add_argument(
        "--layout",
        choices=("src", "flat"),
        help="src/NAME or NAME beside pyproject.toml (default: the project's, else src)",
    )
    parser.add_argument(
        "--no-fastapi", action="store_true", help="leave out the FastAPI dependency and lifespan"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print what it would do, write nothing"
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="diff the project's copies of the guide's code against the guide's current code",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    target: Path = args.target
    try:
        first = _manifest(target) if target.is_dir() else {}
        recorded = first.get("driver")
        driver: Driver = args.driver or ("psycopg" if recorded == "psycopg" else "asyncpg")
        options = _checked_options(target, args.package, driver, not args.no_fastapi, args.layout)
        if args.check:
            if not args.no_fastapi:  # as it was scaffolded: with the API if it has one
                package = target / options.source_root / options.package
                options = replace(options, fastapi=(package / "api").is_dir())
            lines, changed = check(target, options)
            print("\n".join(lines))
            print(
                f"{changed} file(s) differ from the guide's current code"
                if changed
                else "every file is the guide's current code"
            )
            return 1 if changed else 0
        new = not target.exists()
        if new and not args.dry_run:
            target.mkdir()
        outcomes = apply(target, options, dry_run=args.dry_run)
    except ScaffoldError as error:
        print(f"scaffold: {error}", file=sys.stderr)
        return 1
    layout = "src layout" if options.source_root == "src" else "flat layout"
    with_api = "FastAPI" if options.fastapi else "no FastAPI"
    verb = "would scaffold" if args.dry_run else "scaffolded"
    made = ("a directory it would make, " if args.dry_run else "a new directory, ") if new else ""
    print(
        f"{verb} package {options.package} in {target} "
        f"({made}{layout}, {options.driver}, {with_api})"
    )
    for outcome in outcomes:
        prefix = f"{'would be ' if args.dry_run else ''}{outcome.action:<9}"
        if outcome.action == "appended":
            keys = outcome.detail.split(", ")
            print(f"{prefix}{outcome.path} ({len(keys)} keys):")
            print("\n".join(_wrapped("", keys, indent=" " * 9, hang="")))
        else:
            detail = f" ({outcome.detail})" if outcome.detail else ""
            print(f"{prefix}{outcome.path}{detail}")
    notes = warnings(target, options, outcomes) if target.exists() else []
    if recorded in DRIVERS and recorded != options.driver:
        notes.append(
            f"warning: the first run wrote the project for {recorded}; its settings and "
            f"pyproject.toml still say so (this run only wrote missing files for {options.driver})"
        )
    print("\n".join([*notes, *next_steps(target, options)]))
    return 0
