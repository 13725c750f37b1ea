"""`dblayer.replica`: a streaming replica of the embedded server, made by `pg_basebackup -R`."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dblayer import basebackup
from dblayer.binaries import requested_major
from dblayer.embedded import Binaries, EmbeddedPostgres, EmbeddedPostgresError, find_binaries
from dblayer.replica import EmbeddedReplica

SYSTEM_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def connect(server: EmbeddedPostgres) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=server.port,
        user=server.user,
        password=server.password,
        dbname="postgres",
        autocommit=True,
    )


def until_the_primary_shows(primary: EmbeddedPostgres, query: str, row: tuple[object, ...]) -> None:
    """`pg_stat_replication` lags the standby's life: its WAL receiver connects a moment after
    the standby accepts connections, and a WAL sender (a standby's, or pg_basebackup's) exits a
    moment after its client hung up. (Each look a new transaction: autocommit.)"""
    deadline = time.monotonic() + 30
    with connect(primary) as conn:
        while (seen := conn.execute(query).fetchone()) != row:
            assert time.monotonic() < deadline, f"{query}: {seen}, not {row}"
            time.sleep(0.02)


def wait_until_replayed(primary: EmbeddedPostgres, replica: EmbeddedPostgres) -> None:
    """The insert position, not `pg_current_wal_lsn()` (the write position): with
    synchronous_commit off, a commit may still be in the WAL buffers, behind the latter."""
    with connect(primary) as conn:
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    deadline = time.monotonic() + 30
    with connect(replica) as conn:
        while conn.execute("SELECT pg_last_wal_replay_lsn() >= %s", lsn).fetchone() != (True,):
            assert time.monotonic() < deadline, "the replica did not catch up in 30 s"
            time.sleep(0.02)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can enter (the server runs as another user under root)."""
    path = Path(tempfile.mkdtemp(prefix="dblayer-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def primary(open_dir: Path) -> Iterator[EmbeddedPostgres]:
    """The run's binaries (`make test PG=N`: that major), a password a passfile must escape."""
    binaries = find_binaries(major=requested_major())
    with EmbeddedPostgres(binaries, base_dir=open_dir, password="p\\a:s@s/%#?") as server:
        yield server


@pytest.fixture(params=[True, False], ids=["pg_basebackup", "backup-api"])
def pg_basebackup(request: pytest.FixtureRequest, primary: EmbeddedPostgres) -> bool:
    """Made with `pg_basebackup`, or (as for npm's binaries, which lack it) with the API."""
    has = (primary.binaries.bindir / "pg_basebackup").exists()
    if request.param and not has:
        pytest.skip(f"{primary.binaries.source} has no pg_basebackup")
    return bool(request.param)


def test_the_replica_streams_what_the_primary_commits(
    primary: EmbeddedPostgres, pg_basebackup: bool
) -> None:
    replica = EmbeddedReplica(primary, pg_basebackup=pg_basebackup)
    assert repr(replica).endswith(f", stopped, of port {primary.port})")
    with replica:
        assert f"port={replica.port}" in repr(replica)
        assert replica.password not in repr(replica)
        assert replica.port != primary.port
        with connect(replica) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            assert conn.execute("SHOW hot_standby").fetchone() == ("on",)
        with connect(primary) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (42)")
        until_the_primary_shows(
            primary,
            "SELECT state FROM pg_stat_replication WHERE application_name = 'dblayer_replica'",
            ("streaming",),
        )
        wait_until_replayed(primary, replica)
        with connect(replica) as conn:
            assert conn.execute("SELECT n FROM t").fetchone() == (42,)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as caught:
                conn.execute("INSERT INTO t VALUES (1)")
            assert caught.value.sqlstate == "25006"
        directory = replica.directory
    assert not directory.exists()
    assert not replica.running
    assert primary.running  # stopping the replica leaves its primary alone
    # ... and it no longer streams to anyone
    until_the_primary_shows(primary, "SELECT count(*) FROM pg_stat_replication", (0,))


def test_a_replica_needs_its_primary_running(open_dir: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="needs its primary running"):
        EmbeddedReplica(EmbeddedPostgres(base_dir=open_dir))


def test_without_pg_basebackup_the_backup_api_is_used(
    tmp_path: Path, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """npm's packages hold initdb, pg_ctl and postgres only."""
    monkeypatch.delenv("DBLAYER_PG", raising=False)  # pgserver's, which has pg_basebackup
    with EmbeddedPostgres(base_dir=open_dir) as primary:
        assert EmbeddedReplica(primary).pg_basebackup is True  # pgserver's has it
        server_only = tmp_path / "bin"
        server_only.mkdir()
        for program in ("initdb", "pg_ctl", "postgres"):
            (server_only / program).symlink_to(primary.binaries.bindir / program)
        primary.binaries = Binaries(server_only, "npm")
        assert EmbeddedReplica(primary).pg_basebackup is False


def test_a_failed_start_says_why_and_leaves_nothing(
    primary: EmbeddedPostgres, open_dir: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        replica = EmbeddedReplica(primary, port=busy.getsockname()[1])
        with pytest.raises(EmbeddedPostgresError, match="pg_ctl failed"):
            replica.start()
    assert not replica.running
    assert [path.name for path in open_dir.iterdir()] == [primary.directory.name]
    # no standby left streaming
    until_the_primary_shows(primary, "SELECT count(*) FROM pg_stat_replication", (0,))


def test_a_failed_base_backup_says_why_and_leaves_nothing(
    primary: EmbeddedPostgres, open_dir: Path, pg_basebackup: bool
) -> None:
    with connect(primary) as conn:  # a primary that keeps no WAL for backups or standbys
        conn.execute("ALTER SYSTEM SET wal_level = minimal")
        conn.execute("ALTER SYSTEM SET max_wal_senders = 0")
    primary.restart()
    replica = EmbeddedReplica(primary, pg_basebackup=pg_basebackup)
    why = r"pg_basebackup failed: .*max_wal_senders" if pg_basebackup else r"backup failed: .*WAL"
    with pytest.raises(EmbeddedPostgresError, match=why) as caught:
        replica.start()
    assert primary.password not in str(caught.value)
    assert [path.name for path in open_dir.iterdir()] == [primary.directory.name]


@pytest.mark.skipif(not SYSTEM_BINDIRS, reason="no system PostgreSQL in /usr/lib/postgresql")
def test_the_systems_binaries_make_a_replica_too(open_dir: Path) -> None:
    binaries = find_binaries(SYSTEM_BINDIRS[-1])
    with EmbeddedPostgres(binaries, base_dir=open_dir) as primary, EmbeddedReplica(primary) as rep:
        with connect(rep) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            version = conn.execute("SHOW server_version").fetchone()
        assert version is not None
        assert str(version[0]).startswith(binaries.version)


def test_ctrl_c_during_the_copy_leaves_nothing_and_the_next_start_works(
    primary: EmbeddedPostgres, open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM, which the suite turns into it) half-way through the base backup."""

    def interrupted(source: Path, target: Path) -> None:
        raise KeyboardInterrupt

    replica = EmbeddedReplica(primary, pg_basebackup=False)
    with monkeypatch.context() as patch:
        patch.setattr(basebackup, "_copy", interrupted)
        with pytest.raises(KeyboardInterrupt):
            replica.start()
    assert not replica.running
    assert [path.name for path in open_dir.iterdir()] == [primary.directory.name]
    with replica, connect(replica) as conn:  # the backup was stopped: a new one starts
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
