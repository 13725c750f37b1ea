"""The application factory: `uvicorn --factory dblayer.api:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from dblayer.api.errors import add_error_handlers
from dblayer.api.routes import health, tasks, users
from dblayer.engine import create_engine
from dblayer.routing import create_replica_engine, create_routing_sessionmaker
from dblayer.settings import Settings, get_settings

logger = logging.getLogger(__name__)


# --8<-- [start:create_app]
def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; its engine is created at start-up (from the environment unless `settings` is
    given) and disposed at shutdown, so no connection outlives the process's event loop. With
    `DATABASE_REPLICA_URL` set, a replica's engine too, and sessions route reads to it
    (dblayer.routing); without it, a routing session sends everything to the primary."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or get_settings()
        if resolved.db_cursor_secret is None:
            logger.warning(
                "DB_CURSOR_SECRET is not set: page cursors are signed with a key of this process "
                "only, so other instances and workers refuse them; set the same value everywhere"
            )
        engine = create_engine(resolved)
        replica = create_replica_engine(resolved)  # DATABASE_REPLICA_URL unset: None
        app.state.settings = resolved
        app.state.engine = engine
        app.state.replica_engine = replica
        app.state.sessionmaker = create_routing_sessionmaker(engine, replica)
        try:
            yield
        finally:
            await engine.dispose()
            if replica is not None:
                await replica.dispose()

    app = FastAPI(title="dblayer reference app", lifespan=lifespan)
    add_error_handlers(app)
    for module in (health, users, tasks):
        app.include_router(module.router)
    return app
    # --8<-- [end:create_app]
