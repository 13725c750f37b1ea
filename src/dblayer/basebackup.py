"""A base backup without `pg_basebackup`: PostgreSQL's low-level backup API and a file copy.

For binaries that ship the server only (npm's packages: initdb, pg_ctl, postgres), on the same
machine as the primary. The steps of PostgreSQL's "Making a Base Backup Using the Low Level API":
start a backup on one connection (a checkpoint; full-page writes forced on), copy the data
directory while the server runs, stop the backup (a WAL segment switch) and write the
`backup_label` it returns into the copy; then the WAL up to that point, so that the copy is
consistent before it streams the rest. `standby.signal` and `primary_conninfo` make it a standby,
as `pg_basebackup -R` would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

# Emptied in a backup (PostgreSQL's docs list them): the copy recreates their contents itself.
_EMPTY_DIRECTORIES = {
    "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat_tmp",
    "pg_subtrans", "pg_wal",
}  # fmt: skip
# (start, stop) before 15 and since: 15 renamed them (and dropped 14's exclusive mode, off here).
_FUNCTIONS = {
    False: (
        "SELECT pg_start_backup(%s, true, false)",
        "SELECT labelfile FROM pg_stop_backup(false, true)",
    ),
    True: (
        "SELECT pg_backup_start(%s, fast => true)",
        "SELECT labelfile FROM pg_backup_stop(true)",
    ),
}
_LEFT_OUT = {"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map"}


def low_level_backup(
    connection: psycopg.Connection[tuple[object, ...]], source: Path, target: Path, conninfo: str
) -> None:
    """Copy the running server's data directory `source` (reached over `connection`, in
    autocommit) to `target`, a standby that will stream from `conninfo`."""
    start, stop = _FUNCTIONS[connection.info.server_version >= 150000]
    connection.execute(start, ("dblayer_replica",))
    try:
        _copy(source, target)
    finally:
        row = connection.execute(stop).fetchone()
    label = str(row[0]) if row else ""  # one row, always
    (target / "backup_label").write_text(label)
    for segment in (source / "pg_wal").iterdir():  # after the stop: all the backup needs
        if segment.is_file():
            shutil.copy2(segment, target / "pg_wal" / segment.name)
    (target / "standby.signal").touch()
    with (target / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"primary_conninfo = '{conninfo}'\n")


def _copy(source: Path, target: Path) -> None:
    """The files of a running server: one that goes away meanwhile (a temporary file, a dropped
    table) is left out, as `pg_basebackup` does; replaying the WAL makes the copy consistent."""
    target.mkdir(mode=0o700)
    for entry in source.iterdir():
        if entry.name in _LEFT_OUT or entry.name.startswith("pgsql_tmp"):
            continue
        if entry.is_dir():
            if entry.name in _EMPTY_DIRECTORIES:
                (target / entry.name).mkdir(mode=0o700)
            else:
                _copy(entry, target / entry.name)
            continue
        try:
            shutil.copy2(entry, target / entry.name)
        except FileNotFoundError:  # pragma: no cover - removed between listing and copying
            continue
