"""Services: password hashing, duplicates as domain errors, task state rules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dblayer.models import TaskStatus, User
from dblayer.repositories import UserRepository
from dblayer.services import (
    DuplicateError,
    InvalidStateError,
    NotFoundError,
    TaskService,
    UserService,
)
from dblayer.services import users as users_module
from dblayer.services.users import PASSWORDS
from dblayer.session import session_scope


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_scope(sessionmaker) as session:
        yield session


async def register(session: AsyncSession, name: str = "ada", email: str | None = None) -> User:
    return await UserService(session).create(
        email=email or f"{name}@example.com", username=name, password="correct horse"
    )


async def test_passwords_are_hashed_with_argon2(session: AsyncSession) -> None:
    ada = await register(session, email="  Ada@Example.COM ")
    assert ada.email == "ada@example.com"
    assert ada.hashed_password.startswith("$argon2id$")
    assert "correct horse" not in ada.hashed_password
    assert PASSWORDS.verify("correct horse", ada.hashed_password)
    users = UserService(session)
    assert await users.authenticate("ada", "correct horse") is ada
    assert await users.authenticate("ada", "wrong") is None
    assert await users.authenticate("nobody", "correct horse") is None
    ada.is_active = False
    assert await users.authenticate("ada", "correct horse") is None


async def test_duplicates_are_domain_errors_and_the_transaction_survives(
    session: AsyncSession,
) -> None:
    await register(session, "ada")
    with pytest.raises(DuplicateError, match="email is already taken") as email:
        await register(session, "other", email="ADA@example.com")
    assert email.value.field == "email"
    with pytest.raises(DuplicateError, match="username is already taken"):
        await register(session, "ada", email="new@example.com")
    await register(session, "bob")  # the session is still usable
    assert await UserRepository(session).count() == 2


async def test_a_race_is_settled_by_the_unique_index(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """Two registrations at once both pass the check; the index refuses the second, which
    becomes a DuplicateError, rolled back to its savepoint only."""
    barrier = asyncio.Barrier(2)

    async def register_after_both_checked(name: str) -> str:
        async with session_scope(sessionmaker) as session:
            service = UserService(session)
            original = service.users.username_exists

            async def checked(username: str) -> bool:
                exists = await original(username)
                await barrier.wait()  # both checks are done before either inserts
                return exists

            service.users.username_exists = checked  # type: ignore[method-assign]
            try:
                await service.create(
                    email=f"{name}@example.com", username="same", password="correct horse"
                )
            except DuplicateError as error:
                return error.field
            return "created"

    results = await asyncio.gather(*(register_after_both_checked(n) for n in ("a", "b")))
    assert sorted(results) == ["created", "username"]


async def test_an_unexpected_integrity_error_is_not_hidden(session: AsyncSession) -> None:
    await session.execute(text("ALTER TABLE users ADD CONSTRAINT no_bob CHECK (username <> 'bob')"))
    with pytest.raises(IntegrityError, match="no_bob"):
        await register(session, "bob")


async def test_task_rules(session: AsyncSession) -> None:
    ada = await register(session)
    tasks = TaskService(session)
    with pytest.raises(NotFoundError, match=r"user .* not found"):
        await tasks.create(user_id=uuid.uuid4(), title="orphan")
    task = await tasks.create(user_id=ada.id, title="write", description="the chapter")
    assert task.status is TaskStatus.PENDING
    assert task.completed_at is None
    done = await tasks.mark_completed(task.id)
    assert done.status is TaskStatus.COMPLETED
    assert done.completed_at is not None
    first = done.completed_at
    assert (await tasks.mark_completed(task.id)).completed_at == first  # a retry changes nothing
    with pytest.raises(InvalidStateError, match="a completed task cannot be cancelled"):
        await tasks.cancel(task.id)
    other = await tasks.create(user_id=ada.id, title="abandon")
    assert (await tasks.cancel(other.id)).status is TaskStatus.CANCELLED
    with pytest.raises(InvalidStateError, match="a cancelled task cannot be completed"):
        await tasks.mark_completed(other.id)
    with pytest.raises(NotFoundError, match=r"task .* not found"):
        await tasks.get(uuid.uuid4())
    with pytest.raises(NotFoundError, match=r"task .* not found"):
        await tasks.mark_completed(uuid.uuid4())


async def test_a_deleted_user_gets_no_new_tasks(session: AsyncSession) -> None:
    ada = await register(session)
    await UserRepository(session).delete(ada.id)
    with pytest.raises(NotFoundError):
        await TaskService(session).create(user_id=ada.id, title="t")


class CountingHash(PasswordHash):
    """The recommended hasher, counting the verifications and hashes it does."""

    def __init__(self) -> None:
        super().__init__((Argon2Hasher(),))
        self.verified = 0
        self.hashed = 0

    def verify(self, password: str | bytes, hash: str | bytes) -> bool:
        self.verified += 1
        return super().verify(password, hash)

    def verify_and_update(
        self, password: str | bytes, hash: str | bytes
    ) -> tuple[bool, str | None]:
        self.verified += 1
        return super().verify_and_update(password, hash)

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.hashed += 1
        return super().hash(password, salt=salt)


WEAK = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8192, parallelism=1),))


@pytest.mark.parametrize(
    ("username", "password", "stored", "verified"),
    [
        ("ada", "correct horse", "current", 1),
        ("ada", "wrong", "current", 1),
        ("nobody", "correct horse", "current", 1),
        ("ada", "correct horse", "inactive", 1),
        ("ada", "wrong", "inactive", 1),
        ("ada", "wrong", "outdated", 2),  # the cheap outdated hash, then the dummy
        ("ada", "correct horse", "not-a-hash", 1),  # pwdlib would raise UnknownHashError
    ],
    ids=["right", "wrong", "unknown-user", "inactive", "inactive-wrong", "outdated", "unknown"],
)
async def test_authenticate_costs_a_full_verification_on_every_path(
    session: AsyncSession,
    monkeypatch: pytest.MonkeyPatch,
    username: str,
    password: str,
    stored: str,
    verified: int,
) -> None:
    """User enumeration by timing: an unknown user (or a deactivated one, or one with a cheaper
    outdated hash) must cost a verification at today's parameters, about 100 ms, not return at
    once. Counted, not timed: one full verification, and no hashing, unless a correct password
    meets an outdated hash."""
    ada = await register(session)
    ada.is_active = stored != "inactive"
    if stored == "outdated":
        ada.hashed_password = WEAK.hash("correct horse")
    elif stored == "not-a-hash":
        ada.hashed_password = "x"
    counting = CountingHash()
    monkeypatch.setattr(users_module, "PASSWORDS", counting)
    found = await UserService(session).authenticate(username, password)
    assert (counting.verified, counting.hashed) == (verified, 0)
    right = username == "ada" and password == "correct horse"
    assert (found is ada) == (right and stored == "current")


def test_the_dummy_hash_has_todays_parameters() -> None:
    """Verifying it must cost what verifying a real user's hash costs."""
    assert PASSWORDS.current_hasher.identify(users_module.DUMMY_HASH)
    assert not PASSWORDS.current_hasher.check_needs_rehash(users_module.DUMMY_HASH)


async def test_an_outdated_hash_is_replaced_at_login(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with session_scope(sessionmaker) as session:
        ada = await register(session)
        ada.hashed_password = old = WEAK.hash("correct horse")
    async with session_scope(sessionmaker) as session:
        users = UserService(session)
        assert await users.authenticate("ada", "wrong") is None
    async with session_scope(sessionmaker) as session:
        assert (await UserRepository(session).get(ada.id)).hashed_password == old  # type: ignore[union-attr]
        assert await UserService(session).authenticate("ada", "correct horse") is not None
    async with session_scope(sessionmaker) as session:
        stored = (await UserRepository(session).get(ada.id)).hashed_password  # type: ignore[union-attr]
    assert stored != old
    assert not PASSWORDS.current_hasher.check_needs_rehash(stored)
    assert PASSWORDS.verify("correct horse", stored)


async def test_a_rehash_never_undoes_a_password_change_made_meanwhile(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """The login read the old (outdated) hash; a password change committed before its rehash is
    written. The rehash is conditional on the hash it read, so the change stays."""
    async with session_scope(sessionmaker) as session:
        ada = await register(session)
        ada.hashed_password = WEAK.hash("correct horse")
    async with session_scope(sessionmaker) as login:
        user = await UserRepository(login).get_by_username("ada")  # read, and held
        assert user is not None
        async with session_scope(sessionmaker) as change:
            changed = await UserRepository(change).get(ada.id)
            assert changed is not None
            changed.hashed_password = new = PASSWORDS.hash("a new password")
        assert await UserService(login).authenticate("ada", "correct horse") is user
    async with session_scope(sessionmaker) as session:
        stored = await UserRepository(session).get(ada.id)
    assert stored is not None
    assert stored.hashed_password == new
