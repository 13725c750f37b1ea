"""Registering and authenticating users."""

from __future__ import annotations

import asyncio
import secrets
from functools import cache

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

    async def authenticate(self, username: str, password: str) -> User | None:
        """The active user with this username and password, else None (same answer for both).

        Every path verifies exactly one hash, so the time taken does not tell an unknown
        username from a wrong password. A hash made with older parameters is replaced by one
        made with today's (saved by the caller's commit)."""
        user = await self.users.get_by_username(username)
        hashed = user.hashed_password if user is not None else None
        valid, new_hash = await asyncio.to_thread(_verify, password, hashed)
        if user is None or not valid or not user.is_active:
            return None
        if new_hash is not None:
            user.hashed_password = new_hash
        return user


def _verify(password: str, hashed: str | None) -> tuple[bool, str | None]:
    """pwdlib's `verify_and_update`; an unknown user is checked against a dummy hash (and fails)
    so that it costs what a known one costs."""
    if hashed is None:
        PASSWORDS.verify_and_update(password, _dummy_hash())
        return False, None
    return PASSWORDS.verify_and_update(password, hashed)


@cache
def _dummy_hash() -> str:
    return PASSWORDS.hash(secrets.token_urlsafe())
    # --8<-- [end:user_service]
