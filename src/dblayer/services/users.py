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
        """The active user with this username and password, else None (same answer for both)."""
        user = await self.users.get_by_username(username)
        if user is None or not user.is_active:
            return None
        valid = await asyncio.to_thread(PASSWORDS.verify, password, user.hashed_password)
        return user if valid else None
        # --8<-- [end:user_service]
