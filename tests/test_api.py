"""The API in-process (httpx on the ASGI app and its lifespan): statuses, bodies, commit timing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from alembic.script import ScriptDirectory
from fastapi import Depends, FastAPI
from jsonschema import Draft202012Validator, FormatChecker  # type: ignore[import-untyped]
from pydantic import SecretStr
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession

from dblayer.api import create_app, get_session
from dblayer.api.schemas import ValidationErrorRead
from dblayer.migrate import alembic_config, downgrade_to, head_revision
from dblayer.models import User
from dblayer.repositories import InvalidQueryError, TaskRepository
from dblayer.session import session_scope
from dblayer.settings import get_settings
from tests.apps import client_for, new_user, settings_for

HOSTILE = ["'; DROP TABLE tasks; --", "%' OR '1'='1", "_", "\\", "x\x00y", "title)--", "\u202e"]


@pytest.fixture
def app(database_url: URL) -> FastAPI:
    return create_app(settings_for(database_url))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(app):
        yield client


async def test_health_and_ready(client: httpx.AsyncClient, app: FastAPI) -> None:
    head = head_revision()
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "revision": head})


async def test_ready_when_the_database_is_behind(client: httpx.AsyncClient, app: FastAPI) -> None:
    head = head_revision()
    assert head is not None
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head).down_revision
    assert isinstance(previous, str)
    await downgrade_to(app.state.engine, previous)
    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json() == {
        "status": f"migrations pending: at {previous}, head is {head}",
        "revision": previous,
    }


async def test_ready_when_the_database_is_ahead(client: httpx.AsyncClient, app: FastAPI) -> None:
    """A newer release migrated (rolling deploy, rollback): this code's head is applied, so an
    instance of the older release stays in rotation."""
    async with app.state.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    ready = await client.get("/ready")
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ready", "revision": "f00dfeedbeef"},
    )


async def test_users(client: httpx.AsyncClient) -> None:
    ada = await new_user(client)
    assert set(ada) == {"id", "email", "username", "full_name", "is_active", "role", "created_at"}
    assert (await client.get(f"/users/{ada['id']}")).json() == ada
    missing = await client.get(f"/users/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["detail"].endswith("not found")
    duplicate = await client.post(
        "/users",
        json={"email": "ADA@example.com", "username": "ada2", "password": "correct horse"},
    )
    assert (duplicate.status_code, duplicate.json()) == (409, {"detail": "email is already taken"})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "username": "bob", "password": "correct horse"}, "email"),
        ({"email": "b@example.com", "username": "b", "password": "correct horse"}, "username"),
        ({"email": "b@example.com", "username": "x'; --", "password": "correct horse"}, "username"),
        ({"email": "b@example.com", "username": "bob", "password": "hunter2"}, "password"),
        ({"email": "b@example.com", "username": "bob"}, "password"),
    ],
)
async def test_invalid_bodies_are_422_and_never_echo_the_password(
    client: httpx.AsyncClient, body: dict[str, str], field: str
) -> None:
    response = await client.post("/users", json=body)
    assert response.status_code == 422
    assert [error["loc"][-1] for error in response.json()["detail"]] == [field]
    assert "hunter2" not in response.text
    assert "input" not in response.text


async def test_tasks_lifecycle(client: httpx.AsyncClient) -> None:
    ada = await new_user(client)
    created = await client.post("/tasks", json={"user_id": ada["id"], "title": "write"})
    assert created.status_code == 201
    task = created.json()
    assert task["status"] == "pending"
    assert (await client.get(f"/tasks/{task['id']}")).json() == task
    done = await client.post(f"/tasks/{task['id']}/complete")
    assert done.json()["status"] == "completed"
    assert done.json()["completed_at"] is not None
    refused = await client.post(f"/tasks/{task['id']}/cancel")
    assert (refused.status_code, refused.json()) == (
        409,
        {"detail": "a completed task cannot be cancelled"},
    )
    other = (await client.post("/tasks", json={"user_id": ada["id"], "title": "drop"})).json()
    assert (await client.post(f"/tasks/{other['id']}/cancel")).json()["status"] == "cancelled"
    assert (await client.post(f"/tasks/{other['id']}/complete")).status_code == 409
    orphan = await client.post("/tasks", json={"user_id": str(uuid.uuid4()), "title": "t"})
    assert orphan.status_code == 404
    assert (await client.get("/tasks/not-a-uuid")).status_code == 422
    assert (await client.get(f"/tasks/{uuid.uuid4()}")).status_code == 404


async def test_list_search_sort_and_keyset_pages(client: httpx.AsyncClient) -> None:
    ada = await new_user(client)
    for title in ["b 100%", "a 1000", "c_x", "d"]:
        await client.post("/tasks", json={"user_id": ada["id"], "title": title})
    titles: list[str] = []
    cursor = None
    while True:
        params = {"sort": "-title", "limit": "3"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/tasks", params=params)).json()
        titles += [t["title"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert titles == ["d", "c_x", "b 100%", "a 1000"]
    found = await client.get("/tasks", params={"search": "100%"})
    assert [t["title"] for t in found.json()["items"]] == ["b 100%"]
    pending = await client.get("/tasks", params={"status": "pending", "search": "_"})
    assert [t["title"] for t in pending.json()["items"]] == ["c_x"]
    assert (await client.get("/tasks", params={"status": "completed"})).json()["items"] == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": "101"}, "less than or equal to 100"),
        ({"limit": "0"}, "greater than or equal to 1"),
        ({"sort": "hashed_password"}, "String should match pattern '^-?(created_at|"),
        ({"sort": "title; DROP TABLE tasks"}, "String should match pattern"),
        ({"status": "pending' OR '1'='1"}, "Input should be"),
        ({"cursor": "garbage.unsigned"}, "invalid cursor"),  # the shape, not the server's
        (
            {"cursor": "garbage"},
            "String should match pattern '^[A-Za-z0-9_-]+\\\\.[A-Za-z0-9_-]+$'",
        ),
        ({"search": "x" * 201}, "at most 200 characters"),
    ],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, params: dict[str, str], detail: str
) -> None:
    response = await client.get("/tasks", params=params)
    assert response.status_code == 422
    assert detail in response.text
    ValidationErrorRead.model_validate_json(response.text)  # every 422 has the documented shape


async def test_hostile_strings_are_data(client: httpx.AsyncClient, app: FastAPI) -> None:
    ada = await new_user(client)
    for title in HOSTILE:
        created = await client.post("/tasks", json={"user_id": ada["id"], "title": title})
        assert created.status_code in {201, 422}, created.text  # NUL bytes: refused, not a 500
    for term in HOSTILE:
        response = await client.get("/tasks", params={"search": term})
        assert response.status_code in {200, 422}, response.text
    stored = (await client.get("/tasks", params={"limit": "100"})).json()["items"]
    for task in stored:
        found = await client.get("/tasks", params={"search": task["title"]})
        assert task["title"] in [t["title"] for t in found.json()["items"]]
    async with app.state.engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM tasks")) == len(stored)


def reader_app(url: URL, scope: str | None, **values: object) -> FastAPI:
    """The canonical app plus a reader's own endpoints, with the session dependency at `scope`."""
    app = create_app(settings_for(url, **values))
    dependency = Depends(get_session, scope=scope)  # type: ignore[arg-type]

    @app.post("/users/quick", status_code=201)
    async def quick_user(name: str, session: AsyncSession = dependency) -> dict[str, str]:
        session.add(User(email=f"{name}@example.com", username=name, hashed_password="x"))
        return {"created": name}  # no flush: the INSERT runs at commit

    @app.get("/sql/{statement}")
    async def run(statement: str, session: AsyncSession = dependency) -> dict[str, str]:
        allowed = {
            "bad-cast": "SELECT 'x'::int",
            "kill": "SELECT pg_terminate_backend(pg_backend_pid())",
            "missing-table": "SELECT * FROM no_such_table",
        }
        await session.execute(text(allowed[statement]))
        return {}

    return app


@pytest.mark.parametrize(("scope", "expected"), [(None, 201), ("function", 409)])
async def test_a_failing_commit_is_an_error_only_with_the_canonical_dependency(
    database_url: URL, scope: str | None, expected: int
) -> None:
    app = reader_app(database_url, scope)
    async for client in client_for(app):
        assert (await client.post("/users/quick", params={"name": "ada"})).status_code == 201
        again = await client.post("/users/quick", params={"name": "ada"})  # a duplicate at COMMIT
        assert again.status_code == expected
        async with app.state.engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM users")) == 1


@pytest.mark.parametrize(
    ("statement", "status"), [("bad-cast", 422), ("kill", 503), ("missing-table", 500)]
)
async def test_database_errors_by_sqlstate(database_url: URL, statement: str, status: int) -> None:
    async for client in client_for(reader_app(database_url, "function")):
        response = await client.get(f"/sql/{statement}")
        assert response.status_code == status
        assert "SELECT" not in response.text
        if status == 503:
            assert response.headers["retry-after"] == "5"
        if status == 422:  # the database refused a value: the same shape as any other 422
            assert ValidationErrorRead.model_validate_json(response.text).detail[0].loc == []


async def test_database_down_is_503_with_retry_after(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"postgresql+{driver}://app:hunter2@127.0.0.1:1/app"
    app = create_app(get_settings(database_url=url, db_connect_timeout=2))
    async for client in client_for(app):
        assert (await client.get("/health")).status_code == 200  # liveness needs no database
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()["status"]) == (503, "database unavailable")
        for path in ("/tasks", f"/users/{uuid.uuid4()}"):
            response = await client.get(path)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert response.json() == {"detail": "the database is unavailable, try again shortly"}
    assert "cannot connect to 127.0.0.1:1/app" in caplog.text
    assert "hunter2" not in caplog.text


async def test_pool_timeout_is_503(database_url: URL) -> None:
    app = create_app(
        settings_for(database_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.2)
    )
    async for client in client_for(app):
        async with app.state.engine.connect():  # the only connection, held
            response = await client.get("/tasks")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert (await client.get("/tasks")).status_code == 200  # and it recovers


@pytest.mark.parametrize(
    "email",
    ["ada@example.com", "ada.l+x@mail.example", "ada@x.test", "ada@x.TEST", "ada@x.localhost"],
)
async def test_the_schema_says_which_emails_the_app_accepts(
    client: httpx.AsyncClient, email: str
) -> None:
    """`format: email` alone allows special-use domains, which the validator refuses; the schema
    says so (a `not` pattern), so the two agree."""
    schema = (await client.get("/openapi.json")).json()
    rule = schema["components"]["schemas"]["UserCreate"]["properties"]["email"]
    allowed = Draft202012Validator(rule, format_checker=FormatChecker()).is_valid(email)
    body = {"email": email, "username": "ada", "password": "correct horse"}
    response = await client.post("/users", json=body)
    assert response.status_code == (201 if allowed else 422), response.text
    assert allowed is email.endswith(("example.com", ".example"))


async def test_405_lists_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.request("DELETE", "/tasks")
    assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD, POST")
    assert response.json() == {"detail": "Method Not Allowed"}
    undocumented = await client.post("/openapi.json")  # not in the schema: Starlette's answer
    assert undocumented.status_code == 405
    assert set(undocumented.headers["allow"].split(", ")) == {"GET", "HEAD"}  # in any order


async def test_a_cursor_for_another_sort_is_a_422_like_the_others(
    client: httpx.AsyncClient,
) -> None:
    ada = await new_user(client)
    for title in ("a", "b"):
        await client.post("/tasks", json={"user_id": ada["id"], "title": title})
    cursor = (await client.get("/tasks", params={"limit": 1})).json()["next_cursor"]
    response = await client.get("/tasks", params={"sort": "title", "cursor": cursor})
    assert (response.status_code, response.json()) == (
        422,
        {
            "detail": [
                {
                    "loc": ["query"],
                    "msg": "this cursor belongs to another sort order",
                    "type": "invalid_query",
                }
            ]
        },
    )


SHARED_SECRET = "a cursor secret every instance shares, 32+ chars"


async def test_cursors_are_signed_with_the_apps_own_settings(
    database_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """`create_app(settings)` signs with that configuration's `DB_CURSOR_SECRET`, so a second
    instance (or worker) with the same settings accepts the cursor, and only it does."""
    settings = settings_for(database_url).model_copy(
        update={"db_cursor_secret": SecretStr(SHARED_SECRET)}
    )
    app = create_app(settings)
    async for client in client_for(app):
        ada = await client.post(
            "/users", json={"email": "ada@example.org", "username": "ada", "password": "x" * 12}
        )
        for title in ("one", "two"):
            await client.post("/tasks", json={"user_id": ada.json()["id"], "title": title})
        cursor = (await client.get("/tasks", params={"limit": 1})).json()["next_cursor"]
        async with session_scope(app.state.sessionmaker) as session:
            shared = TaskRepository(session, cursor_secret=SecretStr(SHARED_SECRET))
            assert [t.title for t in (await shared.get_multi(limit=1, cursor=cursor)).items] == [
                "two"
            ]
            with pytest.raises(InvalidQueryError):
                await TaskRepository(session).get_multi(limit=1, cursor=cursor)  # another key
    assert "DB_CURSOR_SECRET" not in caplog.text


async def test_an_app_without_a_cursor_secret_says_so_at_start(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    async for _ in client_for(app):
        pass
    assert (
        "DB_CURSOR_SECRET is not set: page cursors are signed with a key of this process only"
        in caplog.text
    )
