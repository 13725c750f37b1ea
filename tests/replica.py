"""A primary with a streaming replica, for tests/test_routing.py and the pages' `needs="replica"`
blocks: the run's own pair (a replica cannot be made from someone's `TEST_DATABASE_URL`).

The run's binaries (`make test PG=N`: that major); the replica is made by `pg_basebackup -R`, or
where they have none (npm's) by the low-level backup API (`dblayer.basebackup`). A block's
database is cloned on the primary and waited for on the replica before the block starts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from dblayer.binaries import requested_major
from dblayer.embedded import EmbeddedPostgres, find_binaries
from dblayer.replica import EmbeddedReplica
from dblayer.settings import Driver
from dblayer.testing import connect
from tests.databases import Databases, Server

CATCH_UP_SECONDS = 30


@dataclass
class ReplicaDatabases:
    """Databases cloned on `primary`, each waited for on `replica` (see `FenceSettings`)."""

    primary: EmbeddedPostgres
    replica: EmbeddedReplica
    databases: Databases

    def fresh(self, driver: Driver) -> tuple[str, dict[str, str]]:
        """A new migrated database, there on the replica too: its name, the block's environment."""
        name = self.databases.clone()
        self.wait_for_replica()
        return name, {
            "DATABASE_URL": self.url(self.primary, name, driver),
            "DATABASE_REPLICA_URL": self.url(self.replica, name, driver),
        }

    @staticmethod
    def url(server: EmbeddedPostgres, database: str, driver: Driver) -> str:
        return server.url(database, driver).render_as_string(hide_password=False)

    def wait_for_replica(self) -> None:
        """Until the replica has replayed all the primary has written (a block before may have
        paused its replay and failed before resuming it: resumed first). The insert position:
        with synchronous_commit off, `pg_current_wal_lsn()` may lag behind a commit."""
        with connect(self.databases.server.admin_url) as primary:
            lsn = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        admin = self.replica.url("postgres").set(drivername="postgresql")
        deadline = time.monotonic() + CATCH_UP_SECONDS
        with connect(admin) as replica:
            replica.execute("SELECT pg_wal_replay_resume()")
            while replica.execute("SELECT pg_last_wal_replay_lsn() >= %s", lsn).fetchone() != (
                True,
            ):
                if time.monotonic() > deadline:  # a broken replica
                    raise TimeoutError(f"the replica did not catch up in {CATCH_UP_SECONDS} s")
                time.sleep(0.02)


@contextlib.contextmanager
def serve_replica_databases() -> Iterator[ReplicaDatabases]:
    """Primary and replica, started now, stopped (and removed) on exit."""
    with (
        EmbeddedPostgres(find_binaries(major=requested_major())) as primary,
        EmbeddedReplica(primary) as replica,
    ):
        url = primary.url("postgres").set(drivername="postgresql")
        origin = f"embedded with a replica, {primary.binaries.source}"
        databases = Databases(Server(url, origin, embedded=primary))
        try:
            yield ReplicaDatabases(primary, replica, databases)
        finally:
            databases.teardown()
