"""Users: register and read."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from dblayer.api.deps import SessionDep
from dblayer.api.schemas import UserCreate, UserRead, errors
from dblayer.models import User
from dblayer.repositories import UserRepository
from dblayer.services import NotFoundError, UserService

router = APIRouter(prefix="/users", tags=["users"], responses=errors(422, 503))


# --8<-- [start:users]
@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=UserRead, responses=errors(400, 409)
)
async def create_user(body: UserCreate, session: SessionDep) -> User:
    return await UserService(session).create(
        email=body.email,
        username=body.username,
        password=body.password.get_secret_value(),
        full_name=body.full_name,
    )


@router.get("/{user_id}", response_model=UserRead, responses=errors(404))
async def get_user(user_id: uuid.UUID, session: SessionDep) -> User:
    user = await UserRepository(session).get(user_id)
    if user is None:
        raise NotFoundError(f"user {user_id} not found")
    return user
    # --8<-- [end:users]
