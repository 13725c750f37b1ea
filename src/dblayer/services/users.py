"""Registering and authenticating users."""

from __future__ import annotations

import asyncio

from pwdlib import PasswordHash
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dblayer.models import User
from dblayer.repositories import UserRepository
from dblayer.services.errors import DuplicateError

# Argon2id with pwdlib's recommended parameters: deliberately slow (tens of milliseconds).
PASSWORDS = PasswordHash.recommended()
# Constraint name -> field, for the race where another request registered the same value
# between our check and our INSERT: the database's unique index is what finally decides.
_UNIQUE_FIELDS = {"uq_users_email_live": "email", "uq_users_username_live": "username"}


# --8<-- [start:user_service]
class UserService:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.users = UserRepository(session)

    async def create(
        self, *, email: str, username: str, password: str, full_name: str | None = None
    ) -> User:
        """Register a user; `DuplicateError` when the email or username is taken."""
        email = email.strip().lower()
        if await self.users.get_by_email(email) is not None:
            raise DuplicateError("email")
        if await self.users.username_exists(username):
            raise DuplicateError("username")
        # Hashing is CPU work: run it in a thread so the event loop keeps serving others.
        hashed = await asyncio.to_thread(PASSWORDS.hash, password)
        # --8<-- [start:savepoint]
        try:
            async with self.session.begin_nested():  # a savepoint: a clash undoes only this
                return await self.users.create(
                    email=email, username=username, hashed_password=hashed, full_name=full_name
                )
        except IntegrityError as error:
            field = next((f for c, f in _UNIQUE_FIELDS.items() if c in str(error.orig)), None)
            if field is None:
                raise
            raise DuplicateError(field) from None
        # --8<-- [end:savepoint]

    async def authenticate(self, username: str, password: str) -> User | None:
        """The active user with this username and password, else None (same answer for both).

        Every path costs one verification at today's parameters, so the time taken does not
        tell an unknown username (or a deactivated one) from a wrong password. An active user's
        hash made with older parameters is replaced by one made with today's."""
        user = await self.users.get_by_username(username)
        if user is None or not user.is_active:
            hashed = user.hashed_password if user is not None else DUMMY_HASH
            await asyncio.to_thread(_verify, password, hashed, update=False)
            return None
        old = user.hashed_password
        valid, new_hash = await asyncio.to_thread(_verify, password, old, update=True)
        if valid and new_hash is not None:
            await self.users.replace_password_hash(user, old=old, new=new_hash)
        return user if valid else None


def _verify(password: str, hashed: str, *, update: bool) -> tuple[bool, str | None]:
    """pwdlib's `verify_and_update` (or `verify`), at full cost on every path: a hash no hasher
    knows, or an outdated (cheaper) one that did not match, is followed by verifying the dummy
    hash, so a wrong answer never comes back sooner than for a current hash."""
    if not any(hasher.identify(hashed) for hasher in PASSWORDS.hashers):
        PASSWORDS.verify(password, DUMMY_HASH)  # pwdlib would raise UnknownHashError: a 500
        return False, None
    if update:
        valid, new_hash = PASSWORDS.verify_and_update(password, hashed)
    else:
        valid, new_hash = PASSWORDS.verify(password, hashed), None
    if not valid and hashed is not DUMMY_HASH and _outdated(hashed):
        PASSWORDS.verify(password, DUMMY_HASH)
    return valid, new_hash


def _outdated(hashed: str) -> bool:
    current = PASSWORDS.current_hasher
    return not current.identify(hashed) or current.check_needs_rehash(hashed)


# An Argon2id hash of a random password nobody kept, at today's parameters (a test checks that
# they still are): what an unknown username is verified against. A constant, so the first
# login of a process does not pay for hashing it.
DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$KMHNK9huyLwPtkRHCtMfTg"
    "$9u17C0Zqqvd/+UQLC5yjt/aGIRQnTxrI7LKNKt81Ou8"
)
# --8<-- [end:user_service]
