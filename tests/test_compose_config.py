"""One configuration: `cp .env.example .env && docker compose up -d --wait` must start a server that
the settings, reading that `.env`, connect to. No Docker here: the compose file is read as YAML and
its `${VAR:-default}` values filled from the `.env` as compose fills them (python-dotenv's parser,
the one the settings' `.env` loading uses), then compared with the settings' URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values
from dotenv.variables import parse_variables

from dblayer.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# The official image: PostgreSQL listens on 5432 in the container; POSTGRES_USER defaults to
# postgres and POSTGRES_DB to the user's name.
CONTAINER_PORT = 5432
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# `NAME=value` lines of .env.example, also the commented-out ones it offers (`# DB_SSLMODE=…`).
_ASSIGNMENT = re.compile(r"^#? *([A-Z][A-Z0-9_]*)=(.*)$", re.M)


def settings_variables() -> set[str]:
    """The environment variables the settings read: one per field, named after it."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {
        f"{prefix}{field.alias or name}".upper() for name, field in Settings.model_fields.items()
    }


def _interpolate(value: object, env: dict[str, str]) -> str:
    """`${VAR:-default}` as compose fills it from `.env` (an empty value takes the default)."""
    given = {name: value for name, value in env.items() if value}
    return "".join(atom.resolve(given) for atom in parse_variables(str(value)))


def _environment(service: dict[str, object], env: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):  # the `- KEY=value` form
        raw = dict(item.split("=", 1) for item in raw)
    assert isinstance(raw, dict)
    return {str(key): _interpolate(value, env) for key, value in raw.items()}


def _published(service: dict[str, object], env: dict[str, str]) -> tuple[str, int, int]:
    """(host address, host port, container port) of the one published port."""
    ports = service.get("ports")
    assert isinstance(ports, list), "the database service publishes no port"
    assert len(ports) == 1, f"expected one published port, found {ports}"
    parts = _interpolate(ports[0], env).split(":")
    address = parts[0] if len(parts) == 3 else "0.0.0.0"  # noqa: S104 - compose's default
    return address, int(parts[-2]), int(parts[-1].split("/")[0])


def disagreements(compose: Path, env_example: Path) -> list[str]:
    """Where the compose file, the example `.env` and the settings reading it disagree; one line
    each, naming the setting but never a password."""
    problems = []
    text = env_example.read_text("utf-8")
    known = settings_variables()
    for name, _ in _ASSIGNMENT.findall(text):
        if name not in known:
            problems.append(f"{env_example.name} names {name}, which the settings do not read")
    env = {name: value or "" for name, value in dotenv_values(env_example).items()}
    settings = get_settings(_env_file=str(env_example))  # as `cp .env.example .env` gives it
    url = settings.url

    services = yaml.safe_load(compose.read_text("utf-8"))["services"]
    assert len(services) == 1, f"expected one service in {compose.name}, found {list(services)}"
    service = next(iter(services.values()))
    environment = _environment(service, env)
    user = environment.get("POSTGRES_USER", "postgres")
    database = environment.get("POSTGRES_DB", user)
    address, port, container_port = _published(service, env)
    if container_port != CONTAINER_PORT:
        problems.append(f"compose publishes container port {container_port}, not {CONTAINER_PORT}")
    if port != url.port:
        problems.append(f"compose publishes port {port}, the settings connect to {url.port}")
    if address not in {"0.0.0.0", "127.0.0.1"} or url.host not in LOOPBACK:  # noqa: S104
        problems.append(f"compose listens on {address}, the settings connect to {url.host}")
    if database != url.database:
        problems.append(f"compose creates database {database!r}, the settings use {url.database!r}")
    if user != url.username:
        problems.append(f"compose creates user {user!r}, the settings connect as {url.username!r}")
    if environment.get("POSTGRES_PASSWORD") != url.password:
        problems.append("compose sets POSTGRES_PASSWORD to another password than the settings use")

    # The one-URL form it offers commented out must name the same server.
    offered = dict(_ASSIGNMENT.findall(text)).get("DATABASE_URL")
    if offered and "DATABASE_URL" not in env:
        same = get_settings(_env_file=str(env_example), database_url=offered).url
        if same.render_as_string(hide_password=False) != url.render_as_string(hide_password=False):
            problems.append(f"the DATABASE_URL {env_example.name} offers is not {url!r}")
    return problems


def test_compose_env_example_and_settings_agree() -> None:
    assert disagreements(COMPOSE, ENV_EXAMPLE) == []


def test_the_settings_read_what_the_check_says() -> None:
    """The variable names come from the model: spot-check them against the documented ones."""
    assert {"DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PASSWORD", "DB_CURSOR_SECRET"} <= (
        settings_variables()
    )
    assert "POSTGRES_DATABASE" not in settings_variables()


PLANTED = {
    "published port": (
        "compose",
        '"127.0.0.1:${POSTGRES_PORT:-5432}:5432"',
        '"127.0.0.1:5433:5432"',
        "compose publishes port 5433, the settings connect to 5432",
    ),
    "container port": (
        "compose",
        ':5432"',
        ':6432"',
        "compose publishes container port 6432, not 5432",
    ),
    "database": (
        "compose",
        "POSTGRES_DB: ${POSTGRES_DB:-app}",
        "POSTGRES_DB: ${POSTGRES_DATABASE:-appdb}",
        "compose creates database 'appdb', the settings use 'app'",
    ),
    "user": (
        "compose",
        "POSTGRES_USER: ${POSTGRES_USER:-postgres}",
        "POSTGRES_USER: admin",
        "compose creates user 'admin', the settings connect as 'postgres'",
    ),
    "password": (
        "compose",
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-postgres}",
        "POSTGRES_PASSWORD: s3cret-planted",
        "compose sets POSTGRES_PASSWORD to another password than the settings use",
    ),
    "unknown variable": (
        "env",
        "DB_ECHO=false",
        "DB_ECHOES=false",
        ".env.example names DB_ECHOES, which the settings do not read",
    ),
    "unknown commented variable": (
        "env",
        "# DB_SSLMODE=verify-full",
        "# DB_SSL_MODE=verify-full",
        ".env.example names DB_SSL_MODE, which the settings do not read",
    ),
    "offered URL": (
        "env",
        "# DATABASE_URL=postgresql://postgres:postgres@localhost:5432/app",
        "# DATABASE_URL=postgresql://postgres:postgres@localhost:5432/other",
        "the DATABASE_URL .env.example offers is not",
    ),
}


@pytest.mark.parametrize("fault", PLANTED)
def test_each_planted_difference_is_reported(fault: str, tmp_path: Path) -> None:
    where, old, new, expected = PLANTED[fault]
    compose, env_example = tmp_path / COMPOSE.name, tmp_path / ENV_EXAMPLE.name
    compose.write_text(COMPOSE.read_text("utf-8"), "utf-8")
    env_example.write_text(ENV_EXAMPLE.read_text("utf-8"), "utf-8")
    planted = compose if where == "compose" else env_example
    text = planted.read_text("utf-8")
    assert old in text, f"{planted.name} no longer has {old!r} to plant a fault at"
    planted.write_text(text.replace(old, new, 1), "utf-8")
    problems = disagreements(compose, env_example)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)
    assert "s3cret-planted" not in problems[0]
    assert "postgres:postgres@" not in problems[0]


def test_a_change_both_sides_make_together_is_no_difference(tmp_path: Path) -> None:
    """Another port in .env moves both compose's published port and the settings' port."""
    compose, env_example = tmp_path / COMPOSE.name, tmp_path / ENV_EXAMPLE.name
    compose.write_text(COMPOSE.read_text("utf-8"), "utf-8")
    env = ENV_EXAMPLE.read_text("utf-8").replace("POSTGRES_PORT=5432", "POSTGRES_PORT=5433")
    env_example.write_text(env.replace("localhost:5432/app", "localhost:5433/app"), "utf-8")
    assert disagreements(compose, env_example) == []
