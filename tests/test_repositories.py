"""Repositories on a real database: CRUD, pages, allow-lists, bulk paths, hostile input."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import Task, TaskStatus, User
from dblayer.repositories import InvalidQueryError, Page, Repository, TaskRepository, UserRepository
from dblayer.repositories.cursors import _encode_payload, default_cursor_secret
from dblayer.session import session_scope
from dblayer.settings import SettingsError, get_settings


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_scope(sessionmaker) as session:
        yield session


async def make_user(session: AsyncSession, name: str = "ada") -> User:
    return await UserRepository(session).create(
        email=f"{name}@example.com", username=name, hashed_password="x"
    )


async def make_tasks(session: AsyncSession, user: User, titles: list[str]) -> list[Task]:
    tasks = TaskRepository(session)
    return [await tasks.create(title=title, user_id=user.id) for title in titles]


async def every_page(repository: Repository[Task], **query: object) -> list[list[str]]:
    """Follow the cursors to the end; the titles of each page."""
    pages, cursor = [], None
    while True:
        page: Page[Task] = await repository.get_multi(cursor=cursor, **query)  # type: ignore[arg-type]
        pages.append([task.title for task in page.items])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


async def test_crud(session: AsyncSession) -> None:
    users = UserRepository(session)
    ada = await make_user(session)
    assert ada.created_at is not None  # flushed: server defaults are there
    assert await users.get(ada.id) is ada
    assert await users.get(uuid.uuid4()) is None
    assert await users.exists(ada.id)
    await users.update(ada, full_name="Ada Lovelace")
    assert (await users.get(ada.id)).full_name == "Ada Lovelace"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="User has no column 'tasks'"):
        await users.update(ada, tasks=[])
    assert await users.count() == 1
    assert await users.delete(ada.id) is True  # soft: the row stays, hidden
    assert await users.get(ada.id) is None
    assert not await users.exists(ada.id)
    assert await users.delete(ada.id) is False
    deleted = await session.scalar(text("SELECT is_deleted FROM users"))
    assert deleted is True


async def test_a_model_without_soft_delete_is_deleted(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    (task,) = await make_tasks(session, await make_user(session), ["t"])
    assert await tasks.delete(task.id) is True
    assert await session.scalar(text("SELECT count(*) FROM tasks")) == 0


async def test_offset_and_keyset_pages_agree(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    ada = await make_user(session)
    titles = [f"task {i:02}" for i in range(7)]
    await make_tasks(session, ada, titles)
    assert await every_page(tasks, sort="title", limit=3) == [titles[:3], titles[3:6], titles[6:]]
    backwards = titles[::-1]
    assert await every_page(tasks, sort="-title", limit=3) == [
        backwards[:3],
        backwards[3:6],
        backwards[6:],
    ]
    # Every row was created in one transaction: equal created_at, ties broken by the key.
    by_time = await every_page(tasks, limit=2)
    assert [t for page in by_time for t in page] == titles
    offset = await tasks.get_multi(sort="title", limit=3, offset=3)
    assert [t.title for t in offset.items] == titles[3:6]
    assert offset.next_cursor is not None
    assert (await tasks.get_multi(limit=7)).next_cursor is None  # an exact fit has no next page


async def test_keyset_pages_by_enum_and_timestamp(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    ada = await make_user(session)
    created = await make_tasks(session, ada, ["a", "b", "c", "d"])
    await tasks.bulk_update([created[1].id, created[3].id], status=TaskStatus.COMPLETED)
    pages = await every_page(tasks, sort="-status", limit=1)
    assert [p[0] for p in pages] == ["d", "b", "c", "a"]  # completed after pending, by enum order
    await tasks.update(created[0], title="a2")
    pages = await every_page(tasks, sort="-updated_at", limit=3)
    # now() is the transaction's start: equal timestamps, so the key decides, descending too.
    assert pages == [["d", "c", "b"], ["a2"]]


async def test_rows_inserted_meanwhile_do_not_shift_a_keyset_page(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    ada = await make_user(session)
    await make_tasks(session, ada, ["b", "d", "f"])
    first = await tasks.get_multi(sort="title", limit=2)
    await make_tasks(session, ada, ["a"])  # sorts before the page we already showed
    second = await tasks.get_multi(sort="title", limit=2, cursor=first.next_cursor)
    assert [t.title for t in second.items] == ["f"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"limit": 0}, "limit must be between 1 and 100"),
        ({"limit": 101}, "limit must be between 1 and 100"),
        ({"offset": -1}, "offset must be >= 0"),
        ({"offset": 2, "cursor": "x"}, "not combined with a cursor"),
        ({"sort": "hashed_password"}, "cannot sort by 'hashed_password'"),
        ({"sort": "title; DROP TABLE tasks"}, "cannot sort by"),
        ({"filters": {"title": "x"}}, "cannot filter by 'title'; allowed: status, user_id"),
        ({"filters": {"status": "done' OR '1'='1"}}, "invalid value for 'status'"),
        ({"filters": {"user_id": "1 OR 1=1"}}, "invalid value for 'user_id'"),
        ({"cursor": "not base64!"}, "invalid cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"[1, 2]").decode()}, "invalid cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "invalid cursor"),
    ],
)
async def test_refused_queries(
    session: AsyncSession, query: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidQueryError, match=message):
        await TaskRepository(session).get_multi(**query)  # type: ignore[arg-type]


def edited(cursor: str, edit: Callable[[list[object]], None]) -> str:
    """The cursor with its payload changed and re-encoded: well-formed, but not what was issued."""
    payload, dot, signature = cursor.partition(".")
    values = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edit(values)
    encoded = base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")
    return encoded + dot + signature


async def test_an_edited_cursor_is_refused(session: AsyncSession) -> None:
    """A client that edits the cursor's value (to skip ahead, or probe) is refused."""
    tasks = TaskRepository(session)
    await make_tasks(session, await make_user(session), ["a", "b", "c", "d"])
    page = await tasks.get_multi(sort="title", limit=1)
    assert page.next_cursor is not None

    def skip_ahead(values: list[object]) -> None:
        values[1] = "c"

    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await tasks.get_multi(sort="title", limit=1, cursor=edited(page.next_cursor, skip_ahead))
    following = await tasks.get_multi(sort="title", limit=1, cursor=page.next_cursor)
    assert [t.title for t in following.items] == ["b"]  # the cursor as issued still pages


async def test_a_cursor_signed_with_another_secret_is_refused(session: AsyncSession) -> None:
    await make_tasks(session, await make_user(session), ["a", "b", "c"])
    ours, theirs = SecretStr("one deployment's secret"), SecretStr("another deployment's")
    page = await TaskRepository(session, cursor_secret=ours).get_multi(sort="title", limit=1)
    assert page.next_cursor is not None
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await TaskRepository(session, cursor_secret=theirs).get_multi(
            sort="title", limit=1, cursor=page.next_cursor
        )
    # Another instance of the app with the same secret accepts it.
    other_instance = TaskRepository(session, cursor_secret=ours)
    following = await other_instance.get_multi(sort="title", limit=1, cursor=page.next_cursor)
    assert [t.title for t in following.items] == ["b"]
    # A user's cursor is not a task's, even with the same sort and secret.
    await UserRepository(session, cursor_secret=ours).create(
        email="b@example.com", username="b", hashed_password="x"
    )
    users = await UserRepository(session, cursor_secret=ours).get_multi(limit=1)
    assert users.next_cursor is not None
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await other_instance.get_multi(limit=1, cursor=users.next_cursor)


async def test_the_secret_comes_from_the_settings(
    session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`DB_CURSOR_SECRET` is read once per process; unset, a random one is made per process."""
    await make_tasks(session, await make_user(session), ["a", "b"])
    secret = "s" * 32
    monkeypatch.setenv("DB_CURSOR_SECRET", secret)
    default_cursor_secret.cache_clear()
    try:
        page = await TaskRepository(session).get_multi(sort="title", limit=1)
        assert page.next_cursor is not None
        configured = TaskRepository(session, cursor_secret=SecretStr(secret))
        assert (await configured.get_multi(sort="title", cursor=page.next_cursor)).items
    finally:
        default_cursor_secret.cache_clear()
    monkeypatch.delenv("DB_CURSOR_SECRET")
    assert default_cursor_secret() == default_cursor_secret()  # one per process
    assert get_settings().db_cursor_secret is None
    with pytest.raises(SettingsError, match="DB_CURSOR_SECRET: must be at least 32 characters"):
        get_settings(db_cursor_secret="changeme")


async def test_a_signed_cursor_is_still_checked(session: AsyncSession) -> None:
    """Validly signed values are still typed: a cursor is never trusted to be SQL-safe."""
    tasks = TaskRepository(session)
    key = str(uuid.uuid4())
    signed = partial(_encode_payload, default_cursor_secret(), "Task")
    with pytest.raises(InvalidQueryError, match="another sort order"):
        await tasks.get_multi(sort="title", cursor=signed(["-title", "x", key]))
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await tasks.get_multi(sort="status", cursor=signed(["status", "'; DROP TABLE", key]))
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await tasks.get_multi(sort="created_at", cursor=signed(["created_at", "yesterday", key]))
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await tasks.get_multi(sort="title", cursor=signed(["title", "x", "not-a-uuid"]))
    with pytest.raises(InvalidQueryError, match="invalid cursor"):
        await tasks.get_multi(sort="title", cursor=signed(["title", "x"]))
    assert await session.scalar(text("SELECT count(*) FROM tasks")) == 0  # still there


async def test_search_matches_wildcards_literally(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    ada = await make_user(session)
    await make_tasks(
        session, ada, ["100% done", "1000 done", "snake_case", "snakeXcase", "O'Brien"]
    )
    found = {
        term: sorted(t.title for t in (await tasks.search_by_title(term)).items)
        for term in ["100%", "e_c", "%", "_", "o'b", "'; DROP TABLE tasks; --", "\\"]
    }
    assert found == {
        "100%": ["100% done"],
        "e_c": ["snake_case"],
        "%": ["100% done"],
        "_": ["snake_case"],
        "o'b": ["O'Brien"],
        "'; DROP TABLE tasks; --": [],
        "\\": [],
    }
    assert await tasks.count() == 5
    ascending, descending = [
        [t.title for t in (await tasks.search_by_title("done", sort=s)).items]
        for s in ("title", "-title")
    ]
    assert sorted(ascending) == ["100% done", "1000 done"]  # in the collation's order
    assert descending == ascending[::-1]
    page = await tasks.search_by_title("done", filters={"status": "completed"})
    assert page.items == []


async def test_task_queries(session: AsyncSession) -> None:
    tasks = TaskRepository(session)
    ada, bob = await make_user(session, "ada"), await make_user(session, "bob")
    a1, a2, _ = await make_tasks(session, ada, ["a1", "a2", "a3"])
    (b1,) = await make_tasks(session, bob, ["b1"])
    await tasks.update(a1, status=TaskStatus.COMPLETED)
    await tasks.update(a2, status=TaskStatus.IN_PROGRESS)

    def titles(page: Page[Task]) -> list[str]:
        return [t.title for t in page.items]

    assert titles(await tasks.get_by_user(ada.id)) == ["a1", "a2", "a3"]
    assert titles(await tasks.get_by_status(TaskStatus.PENDING)) == ["a3", "b1"]
    assert titles(await tasks.get_completed()) == ["a1"]
    assert titles(await tasks.get_in_progress()) == ["a2"]
    assert titles(await tasks.get_pending(limit=1)) == ["a3"]
    assert titles(await tasks.get_user_tasks_by_status(bob.id, TaskStatus.PENDING)) == ["b1"]
    assert await tasks.count({"user_id": ada.id}) == 3
    assert await tasks.count(where=[Task.title.startswith("b")]) == 1
    assert b1 in (await tasks.get_by_user(bob.id)).items


async def test_user_queries(session: AsyncSession) -> None:
    users = UserRepository(session)
    ada, bob = await make_user(session, "ada"), await make_user(session, "bob")
    await make_tasks(session, ada, ["a1", "a2"])
    assert await users.get_by_username("ada") is ada
    assert await users.get_by_email("ADA@example.com") is ada
    assert await users.get_by_email("nobody@example.com") is None
    assert await users.username_exists("bob")
    assert not await users.username_exists("carol")
    session.expunge_all()  # a fresh load, so the eager load is what fills `tasks`
    loaded = await users.get_user_with_tasks(ada.id)
    assert loaded is not None
    assert sorted(t.title for t in loaded.tasks) == ["a1", "a2"]  # no lazy load needed
    counts = [(u.username, n) for u, n in await users.get_users_with_task_counts()]
    assert counts == [("ada", 2), ("bob", 0)]
    await users.delete(bob.id)
    assert [u.username for u, _ in await users.get_users_with_task_counts()] == ["ada"]
    assert [u.username for u in (await users.get_multi(filters={"is_active": True})).items] == [
        "ada"
    ]


async def test_bulk_create_small_and_through_copy(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        tasks = TaskRepository(session)
        assert await tasks.bulk_create([]) == 0
        # COPY as the transaction's first statement: it must still belong to the transaction.
        ada_id = uuid.uuid4()
        users = UserRepository(session)
        assert (
            await users.bulk_create(
                [
                    {
                        "id": ada_id,
                        "email": f"u{i}@example.com",
                        "username": f"u{i}",
                        "hashed_password": "x",
                    }
                    for i in range(1)
                ]
            )
            == 1
        )
    async with session_scope(sessionmaker) as session:
        tasks = TaskRepository(session)
        rows = [{"title": f"t{i}", "user_id": ada_id} for i in range(TaskRepository.copy_threshold)]
        assert await tasks.bulk_create(rows) == len(rows)
        rows = [
            {"title": "done", "user_id": ada_id, "status": TaskStatus.COMPLETED} for _ in range(10)
        ]
        assert await tasks.bulk_create(rows) == 10
    async with sessionmaker() as session:
        tasks = TaskRepository(session)
        assert await tasks.count() == TaskRepository.copy_threshold + 10
        assert await tasks.count({"status": TaskStatus.COMPLETED}) == 10
        ids = await session.scalars(select(Task.id).order_by(Task.id))
        assert len(set(ids)) == TaskRepository.copy_threshold + 10  # keys made per row


@pytest.mark.parametrize("first_statement", [True, False])
async def test_copy_rolls_back_with_the_transaction(
    sessionmaker: async_sessionmaker[AsyncSession], first_statement: bool
) -> None:
    async with session_scope(sessionmaker) as session:
        ada = await make_user(session)
    rows = [{"title": f"t{i}", "user_id": ada.id} for i in range(TaskRepository.copy_threshold)]
    with pytest.raises(RuntimeError):
        async with session_scope(sessionmaker) as session:
            if not first_statement:
                await session.execute(select(1))
            await TaskRepository(session).bulk_create(rows)
            raise RuntimeError("after the COPY")
    async with sessionmaker() as session:
        assert await TaskRepository(session).count() == 0


async def test_copy_refuses_unknown_columns(session: AsyncSession) -> None:
    rows = [{"title": "t", "owner": "x"}] * TaskRepository.copy_threshold
    with pytest.raises(ValueError, match=r"Task has no column\(s\) \['owner'\]"):
        await TaskRepository(session).bulk_create(rows)


async def test_bulk_update_and_delete(session: AsyncSession) -> None:
    tasks, users = TaskRepository(session), UserRepository(session)
    ada, bob = await make_user(session, "ada"), await make_user(session, "bob")
    created = await make_tasks(session, ada, ["a", "b", "c"])
    ids = [t.id for t in created]
    assert await tasks.bulk_update(ids[:2], status=TaskStatus.CANCELLED) == 2
    assert await tasks.count({"status": TaskStatus.CANCELLED}) == 2
    with pytest.raises(ValueError, match="no column 'nope'"):
        await tasks.bulk_update(ids, nope=1)
    assert await tasks.bulk_delete([*ids[:2], uuid.uuid4()]) == 2
    assert await tasks.count() == 1
    assert await users.bulk_delete([ada.id, bob.id]) == 2  # soft
    assert await users.bulk_delete([ada.id]) == 0  # already deleted: not counted again
    assert await users.count() == 0
    assert await session.scalar(select(func.count()).select_from(text("users"))) == 2


def test_a_nullable_sort_column_is_refused_at_class_definition() -> None:
    with pytest.raises(TypeError, match="'completed_at' is nullable"):

        class Bad(Repository[Task]):
            model = Task
            sortable = ("completed_at",)
