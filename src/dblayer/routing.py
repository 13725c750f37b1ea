"""Read routing: reads to a replica, writes to the primary, and read-your-writes after a write.

A session of `create_routing_sessionmaker` decides per statement, in `get_bind` (SQLAlchemy's
"custom vertical partitioning"): a flush, an INSERT/UPDATE/DELETE, a `SELECT … FOR UPDATE`, a
SELECT with a data-modifying CTE, a SELECT marked `.execution_options(primary=True)` and a
`text()` statement (which could be anything) go to the primary, and so does everything after them
in the same session: a replica replays the primary's WAL a little later, so a read right after a
write could miss it. A session whose `info["primary"]` is set stays on the primary from the
start (the API sets it for a request that may write: see `api/deps.py`). Other SELECTs go to the
replica: a read whose result feeds a write (read,
change, commit) must say `primary=True` or `with_for_update()`, else it may read a stale row and
its commit overwrite a newer value; so must a SELECT of a function that writes (`nextval`).
Without a replica, all goes to the primary.

A replica that cannot be reached fails the read fast (`DatabaseUnavailableError`, which the API
answers with 503) instead of moving every read to the primary at the moment capacity is short:
take it out by unsetting `DATABASE_REPLICA_URL`. The library option with more (several replicas,
context managers): advanced-alchemy's routing session.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql import ClauseElement, visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import CTE

from dblayer.engine import create_engine
from dblayer.session import create_sessionmaker
from dblayer.settings import Settings

__all__ = ["RoutingSession", "create_replica_engine", "create_routing_sessionmaker"]


# --8<-- [start:routing_session]
class RoutingSession(Session):
    """The sync session inside each `AsyncSession`, which picks the server per statement."""

    def __init__(self, *, replica: Engine | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.replica = replica
        self.wrote = False  # once true, the rest of this session stays on the primary

    def get_bind(
        self,
        mapper: type[Any] | Mapper[Any] | None = None,
        *,
        clause: ClauseElement | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        primary = super().get_bind(mapper, clause=clause, **kw)
        if self.replica is None or self.wrote or self.info.get("primary"):
            return primary
        if self._flushing or not _is_plain_read(clause):
            self.wrote = True  # read-your-writes: later reads must see what this one changes
            return primary
        return self.replica

    def close(self) -> None:
        """Closed (e.g. at the end of a request): the next use starts on the replica again."""
        super().close()
        self.wrote = False


def _is_plain_read(clause: ClauseElement | None) -> bool:
    """A SELECT that locks nothing, writes in no CTE (`WITH x AS (INSERT …) SELECT …`) and was
    not sent to the primary by `.execution_options(primary=True)`: for a read whose result feeds
    a write, and for a function that writes (`nextval`, `txid_current`), which is not seen.
    (`session.connection()` with no statement is not a plain read.)"""
    return (
        isinstance(clause, Select)
        and clause._for_update_arg is None
        and not clause.get_execution_options().get("primary", False)
        and not any(_writes(element) for element in visitors.iterate(clause))
    )


def _writes(element: object) -> bool:
    return isinstance(element, CTE) and isinstance(element.element, UpdateBase)
    # --8<-- [end:routing_session]


# --8<-- [start:routing_sessionmaker]
def create_replica_engine(settings: Settings) -> AsyncEngine | None:
    """The replica's engine (`DATABASE_REPLICA_URL`, pooled like the primary's); unset: None."""
    replica = settings.for_replica()
    return None if replica is None else create_engine(replica)


def create_routing_sessionmaker(
    primary: AsyncEngine, replica: AsyncEngine | None
) -> async_sessionmaker[AsyncSession]:
    """`create_sessionmaker`'s factory, whose sessions route their statements (see above)."""
    sessionmaker = create_sessionmaker(primary)
    sessionmaker.configure(
        sync_session_class=RoutingSession,
        replica=None if replica is None else replica.sync_engine,
    )
    return sessionmaker
    # --8<-- [end:routing_sessionmaker]
