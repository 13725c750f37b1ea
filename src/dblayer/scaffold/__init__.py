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
import difflib
import keyword
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from string import Template

from dblayer.scaffold.render import (
    SOURCE,
    ScaffoldError,
    canonical_text,
    drop,
    include,
    rename,
)
from dblayer.settings import DRIVERS, Driver

__all__ = ["Emitted", "Outcome", "ScaffoldError", "apply", "check", "main", "plan"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
ROOT_FILES = SOURCE.parent.parent  # the checkout: alembic.ini, docker-compose.yml, .env.example
_PACKAGE = re.compile(r"[a-z][a-z0-9_]{0,19}")  # the test plugin's database prefix must fit 30
# The testing plugin's FastAPI fixtures, left out with --no-fastapi.
_FASTAPI_FIXTURES = ("app", "session_dependency", "_depends_on", "client")
_ENV_KEY = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")


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
        text = canonical_text(f"dblayer.{module}")
        return python(drop(text, without) if without else text)

    def template(name: str) -> str:
        return python(include(_template(name)))

    files = [
        Emitted(f"{base}/__init__.py", template("package_init.py.tmpl"), canonical=False),
        Emitted(f"{base}/settings.py", canonical("settings"), canonical=True),
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


def env_entries(driver: Driver) -> list[tuple[str, str]]:
    """The guide's `.env.example` as (key, its lines: the comments above it and the line)."""
    entries: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in (ROOT_FILES / ".env.example").read_text("utf-8").splitlines(keepends=True):
        match = _ENV_KEY.match(line)
        if match is None:
            pending.append(line)
            continue
        if match.group(1) == "DATABASE_DRIVER":
            line = f"DATABASE_DRIVER={driver}\n"
        entries.append((match.group(1), "".join([*pending, line])))
        pending = []
    return entries


def _env_keys(text: str) -> set[str]:
    """The keys a `.env.example` mentions, set or commented out (either way the reader knows)."""
    return {m.group(1) for line in text.splitlines() if (m := _ENV_KEY.match(line))}


def _missing_env(target: Path, driver: Driver) -> tuple[str | None, list[tuple[str, str]]]:
    path = target / ".env.example"
    existing = path.read_text("utf-8") if path.is_file() else None
    known = _env_keys(existing or "")
    return existing, [(key, lines) for key, lines in env_entries(driver) if key not in known]


def _checked_options(target: Path, package: str, driver: Driver, fastapi: bool) -> Options:
    """The prerequisites, each refused in one line: a directory, a package name, a readable
    pyproject.toml. The layout follows the project's: `NAME/` beside pyproject.toml if it is
    there, else `src/NAME/`."""
    if not target.exists():
        raise ScaffoldError(f"{target}: no such directory")
    if not target.is_dir():
        raise ScaffoldError(f"{target}: not a directory")
    if (
        not _PACKAGE.fullmatch(package)
        or keyword.iskeyword(package)
        or package in sys.stdlib_module_names
        or package == "dblayer"
    ):
        raise ScaffoldError(
            f"--package {package!r}: not a valid package name (lower-case letters, digits and _, "
            "a letter first, at most 20; not a keyword, a standard module or dblayer)"
        )
    pyproject = target / "pyproject.toml"
    if pyproject.exists():
        try:
            with pyproject.open("rb") as file:
                tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ScaffoldError(f"{pyproject}: cannot read it ({exc})") from None
    flat = (target / package / "__init__.py").is_file()
    return Options(package, driver, fastapi, "." if flat else "src")


def apply(target: Path, options: Options, *, dry_run: bool = False) -> list[Outcome]:
    """Write what is missing; never overwrite. The outcomes, in the order of `plan`."""
    outcomes: list[Outcome] = []
    for file in plan(options):
        path = target / file.path
        if path.exists():
            outcomes.append(Outcome(file.path, "skipped", "exists"))
            continue
        if not dry_run:
            _write(path, file.text)
        outcomes.append(Outcome(file.path, "created"))
    existing, missing = _missing_env(target, options.driver)
    if existing is None:
        text = "".join(lines for _, lines in missing)
        outcomes.append(Outcome(".env.example", "created"))
    elif missing:
        separator = "" if existing.endswith("\n") or not existing else "\n"
        added = "# The database layer's settings (python -m dblayer.scaffold):\n"
        text = existing + separator + added + "".join(lines for _, lines in missing)
        outcomes.append(Outcome(".env.example", "appended", ", ".join(k for k, _ in missing)))
    else:
        outcomes.append(Outcome(".env.example", "skipped", "has every key"))
        return outcomes
    if not dry_run:
        _write(target / ".env.example", text)
    return outcomes


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    except OSError as exc:
        raise ScaffoldError(f"cannot write {path}: {exc.strerror or exc}") from None


def check(target: Path, options: Options) -> tuple[list[str], int]:
    """Lines to print, and how many of the guide's files differ from the project's copy (or are
    missing). The reader's own starting points (the example model, the tests) are not compared."""
    lines: list[str] = []
    changed = 0
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
        lines.append(f"changed   {file.path}")
        lines += _diff(yours, file.text, file.path)
    _, missing = _missing_env(target, options.driver)
    if missing:
        changed += 1
        lines.append(f"missing   .env.example keys: {', '.join(key for key, _ in missing)}")
    return lines, changed


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
                ],
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
    parser.add_argument("target", type=Path, help="the project's directory (it must exist)")
    parser.add_argument("--package", required=True, help="the package to write (e.g. shop)")
    parser.add_argument(
        "--driver",
        choices=DRIVERS,
        default="asyncpg",
        help="DATABASE_DRIVER in .env.example and the dependency to install (asyncpg)",
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
        options = _checked_options(target, args.package, args.driver, not args.no_fastapi)
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
        outcomes = apply(target, options, dry_run=args.dry_run)
    except ScaffoldError as error:
        print(f"scaffold: {error}", file=sys.stderr)
        return 1
    layout = "src layout" if options.source_root == "src" else "flat layout"
    with_api = "FastAPI" if options.fastapi else "no FastAPI"
    verb = "would scaffold" if args.dry_run else "scaffolded"
    print(f"{verb} package {options.package} in {target} ({layout}, {options.driver}, {with_api})")
    for outcome in outcomes:
        prefix = f"{'would be ' if args.dry_run else ''}{outcome.action:<9}"
        if outcome.action == "appended":
            keys = outcome.detail.split(", ")
            print(f"{prefix}{outcome.path} ({len(keys)} keys):")
            print("\n".join(_wrapped("", keys, indent=" " * 9, hang="")))
        else:
            detail = f" ({outcome.detail})" if outcome.detail else ""
            print(f"{prefix}{outcome.path}{detail}")
    print("\n".join(next_steps(target, options)))
    return 0
