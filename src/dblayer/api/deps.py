"""The session dependency: one session per request, committed before the response is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from dblayer.session import session_scope


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session in a transaction for one request: committed when the endpoint returns,
    rolled back when it raises (the error handlers then answer)."""
    async with session_scope(request.app.state.sessionmaker) as session:
        if request.method not in READ_ONLY_METHODS:
            # A request that may write reads on the primary too (with DATABASE_REPLICA_URL: see
            # dblayer.routing): the services check before they write, and a replica behind would
            # answer those checks with what the primary no longer holds.
            session.info["primary"] = True
        yield session


READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# scope="function" (FastAPI >= 0.121) runs the code after `yield`, the COMMIT, before the
# response is sent: a failing commit becomes an error response, not a 201 for lost data.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
