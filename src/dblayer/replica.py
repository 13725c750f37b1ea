"""A streaming replica of an `EmbeddedPostgres`, for trying read routing on one machine.

Made as on a real deployment: `pg_basebackup -R` copies the primary's data directory over the
replication protocol and writes the connection the standby streams from (`primary_conninfo`,
`standby.signal`); the copy then starts on a port of its own as a hot standby (read-only queries
while it replays the primary's WAL). Same binaries as the primary: a standby must run the same
major. The primary needs nothing of its own: initdb's `pg_hba.conf` already lets 127.0.0.1 in for
replication (with the server's auth method), and `wal_level = replica` is the default. Binaries
without `pg_basebackup` (npm's packages) get the same copy from the low-level backup API:
`dblayer.basebackup`.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from dblayer.basebackup import low_level_backup
from dblayer.embedded import EmbeddedPostgres, EmbeddedPostgresError

__all__ = ["EmbeddedReplica"]


class EmbeddedReplica(EmbeddedPostgres):
    """A hot standby of a running `primary`: same user, password and binaries, its own port.

    `start()` (or `with`) makes and starts it, `stop()` removes it (also at exit, and when the
    start fails half-way), like any `EmbeddedPostgres`; stopping it leaves the primary running.
    """

    def __init__(
        self,
        primary: EmbeddedPostgres,
        *,
        port: int | None = None,
        pg_basebackup: bool | None = None,
    ) -> None:
        """`pg_basebackup`: copy with it (None: where the binaries have it, as npm's do not;
        without it, with the low-level backup API: `dblayer.basebackup`)."""
        if not primary.running:
            raise EmbeddedPostgresError("a replica needs its primary running: start it first")
        if pg_basebackup is None:
            pg_basebackup = (primary.binaries.bindir / "pg_basebackup").exists()
        self.pg_basebackup = pg_basebackup
        super().__init__(
            primary.binaries,
            user=primary.user,
            password=primary.password,
            port=port,
            base_dir=primary.base_dir,
            auth=primary.auth,
            run_as=primary.run_as.pw_name,
        )
        self.primary = primary

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"EmbeddedReplica({self.binaries.source}, {state}, of port {self.primary.port})"

    def _initdb(self) -> None:
        """Instead of a new cluster: a base backup of the primary, which streams from it."""
        directory = self.directory
        self._give(directory)
        # The password goes in a passfile (mode 0600), never on a command line `ps` shows; the
        # standby keeps reading it (pg_basebackup -R names it in primary_conninfo).
        passfile = directory / "pgpass"
        passfile.write_text(f"127.0.0.1:{self.primary.port}:*:{self.user}:{_escaped(self)}\n")
        passfile.chmod(0o600)
        self._give(passfile)
        self._bindir = bindir = self._usable_bindir()
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user={self.user} "
            f"passfile={passfile} application_name=dblayer_replica"
        )
        data = directory / "data"
        if self.pg_basebackup:
            self._run(
                str(bindir / "pg_basebackup"),
                "-d", conninfo,
                "-D", str(data),
                "-R",  # standby.signal + primary_conninfo: start as a standby of this primary
                "-X", "stream",  # the WAL written during the copy comes along
                "-c", "fast",  # checkpoint now rather than wait for the next one
                "--no-sync",
            )  # fmt: skip
        else:
            self._copy_without_pg_basebackup(data, conninfo)
        # The copy has the primary's postgresql.conf: its own port and socket directory win.
        settings = [f"port = {self.port}", f"unix_socket_directories = '{directory}'"]
        with (directory / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# dblayer.replica\n" + "\n".join(settings) + "\n")

    def _copy_without_pg_basebackup(self, data: Path, conninfo: str) -> None:
        primary = self.primary
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=primary.port,
                user=primary.user,
                password=None if primary.auth == "trust" else primary.password,
                dbname="postgres",
                autocommit=True,
            ) as conn:
                low_level_backup(conn, primary.directory / "data", data, conninfo)
        except psycopg.Error as exc:  # the driver's message: it never contains the password
            raise EmbeddedPostgresError(f"the base backup failed: {exc}") from None
        for path in [data, *data.rglob("*")]:  # ours (root's) until given to the server's user
            self._give(path)


def _escaped(server: EmbeddedPostgres) -> str:
    r"""The password as a passfile field: `\` and `:` escaped with a backslash."""
    return server.password.replace("\\", "\\\\").replace(":", "\\:")
