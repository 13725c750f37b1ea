"""The embedded server: finding binaries, running as root, starting, stopping, the command line."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dblayer import embedded
from dblayer.embedded import Binaries, EmbeddedPostgres, EmbeddedPostgresError, find_binaries

SYSTEM_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
needs_system_postgres = pytest.mark.skipif(
    not SYSTEM_BINDIRS, reason="no system PostgreSQL in /usr/lib/postgresql to fall back on"
)


def query(server: EmbeddedPostgres, sql: str) -> object:
    url = server.url()
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=server.password, dbname="postgres"
    ) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


def test_pgserver_is_preferred() -> None:
    binaries = find_binaries()
    assert binaries.source.startswith("pgserver ")
    assert binaries.version.startswith("16.")


@needs_system_postgres
def test_system_binaries_when_pgserver_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_pgserver_bindir", lambda: None)
    binaries = find_binaries()
    assert binaries.source.startswith("system binaries in ")
    assert (binaries.bindir / "pg_ctl").exists()


def test_pgserver_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert embedded._pgserver_bindir() is None


def test_debian_layout_without_pg_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert embedded._system_bindirs() == sorted(
        SYSTEM_BINDIRS, key=lambda p: int(p.parent.name), reverse=True
    )


def test_pg_config_is_asked_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {tmp_path}\n")
    pg_config.chmod(0o755)
    monkeypatch.setattr("shutil.which", lambda name: str(pg_config))
    assert embedded._system_bindirs()[0] == tmp_path
    pg_config.write_text("#!/bin/sh\nexit 1\n")
    assert tmp_path not in embedded._system_bindirs()


def test_no_binaries_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_pgserver_bindir", lambda: None)
    monkeypatch.setattr(embedded, "_system_bindirs", lambda: [Path("/nonexistent/bin")])
    with pytest.raises(EmbeddedPostgresError, match="pip install pgserver"):
        find_binaries()


def test_an_explicit_directory_must_hold_initdb(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="has no initdb"):
        find_binaries(tmp_path)


def test_version_falls_back_to_the_whole_line(tmp_path: Path) -> None:
    (tmp_path / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) devel'\n")
    (tmp_path / "postgres").chmod(0o755)
    assert Binaries(tmp_path, "test").version == "postgres (PostgreSQL) devel"


def test_runs_unprivileged_when_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert embedded._unprivileged_user() is None
    monkeypatch.setattr("os.geteuid", lambda: 0)
    user = embedded._unprivileged_user()
    assert user is not None
    assert user.pw_uid != 0

    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr("pwd.getpwnam", no_such_user)
    with pytest.raises(EmbeddedPostgresError, match="neither a 'postgres' nor a 'nobody'"):
        embedded._unprivileged_user()


def test_data_goes_to_ram_when_there_is_room(monkeypatch: pytest.MonkeyPatch) -> None:
    shm = Path("/dev/shm")  # noqa: S108
    if shm.is_dir():
        assert embedded.default_base_dir() in (shm, None)

    def no_shm(path: Path) -> object:
        raise FileNotFoundError(path)

    monkeypatch.setattr("shutil.disk_usage", no_shm)
    assert embedded.default_base_dir() is None


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dblayer-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def as_another_user(server: EmbeddedPostgres) -> EmbeddedPostgres:
    """Run the root code path: as root it is the real one; otherwise "another user" is us."""
    if server._owner is None:
        server._owner = pwd.getpwuid(os.getuid())
    return server


def test_a_base_dir_the_server_user_cannot_write_is_refused(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EmbeddedPostgres, "_run_ok", lambda self, *cmd: cmd[0] != "test")
    server = as_another_user(EmbeddedPostgres(base_dir=open_dir))
    with pytest.raises(EmbeddedPostgresError, match=r"cannot write to .*choose a base_dir"):
        server.start()
    assert list(open_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root is refused by initdb")
def test_root_itself_is_refused_by_postgresql(open_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=open_dir)
    server._owner = None
    with pytest.raises(EmbeddedPostgresError, match=r"initdb failed: .*root"):
        server.start()


def test_start_query_stop(open_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=open_dir)
    assert repr(server).endswith(", stopped)")
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        _ = server.directory
    with server:
        assert server.start() is server  # starting twice is harmless
        assert f"port={server.port}" in repr(server)
        assert server.password not in repr(server)
        assert server.password not in str(server.url())
        assert query(server, "SELECT current_setting('listen_addresses')") == "127.0.0.1"
        assert query(server, "SELECT current_setting('fsync')") == "off"
        directory = server.directory
        assert directory.parent == open_dir
    assert not directory.exists()
    server.stop()  # stopping twice is harmless too
    assert not server.running


@needs_system_postgres
def test_system_postgres_can_be_embedded_too() -> None:
    binaries = find_binaries(SYSTEM_BINDIRS[-1])
    with EmbeddedPostgres(binaries) as server:
        assert str(query(server, "SHOW server_version")).startswith(binaries.version)


def test_binaries_are_copied_when_the_user_cannot_reach_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EmbeddedPostgres, "_run_ok", lambda self, *cmd: cmd[0] == "test")
    with as_another_user(EmbeddedPostgres()) as server:
        assert server._bindir == server.directory / "pg" / "pgserver" / "pginstall" / "bin"
        assert query(server, "SELECT 1") == 1


def test_a_copy_keeps_the_installation_layout(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = open_dir / "vendor" / "pg16"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "initdb").write_text("#!/bin/sh\n")
    monkeypatch.setattr(EmbeddedPostgres, "_run_ok", lambda self, *cmd: False)
    server = as_another_user(EmbeddedPostgres(Binaries(install / "bin", "test")))
    server._dir = open_dir / "server"
    server._dir.mkdir()
    assert server._usable_bindir() == server._dir / "pg" / "vendor" / "pg16" / "bin"
    assert (server._dir / "pg" / "vendor" / "pg16" / "bin" / "initdb").exists()


def test_stop_after_the_server_died_still_cleans_up(open_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=open_dir).start()
    server._pg_ctl("stop", "-w", "-m", "immediate")
    server.stop()
    assert list(open_dir.iterdir()) == []


def test_a_failed_start_says_why_and_leaves_nothing(open_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedPostgres(port=busy.getsockname()[1], base_dir=open_dir)
        with pytest.raises(EmbeddedPostgresError, match="pg_ctl failed") as caught:
            server.start()
    assert "could not" in str(caught.value)  # the server log's own words
    assert not server.running
    assert list(open_dir.iterdir()) == []


def test_run_ok_is_false_when_the_program_cannot_be_executed(tmp_path: Path) -> None:
    server = EmbeddedPostgres()
    assert server._run_ok(str(tmp_path)) is False  # a directory: PermissionError


def stop_when(ready: Callable[[], bool]) -> threading.Thread:
    """Send ourselves SIGTERM, as `kill` would, once `ready()` is true."""

    def wait_then_kill() -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=wait_then_kill)
    thread.start()
    return thread


def test_the_command_line_serves_until_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url_file = tmp_path / "url"
    before = signal.getsignal(signal.SIGTERM)
    stopper = stop_when(url_file.exists)
    assert embedded.main(["--url-file", str(url_file), "--driver", "psycopg"]) == 0
    stopper.join()
    out = capsys.readouterr().out
    assert out.startswith("PostgreSQL 16.")
    url = url_file.read_text().strip()
    assert url.startswith("postgresql+psycopg://postgres:")
    assert f"DATABASE_URL={url}" in out
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_signal_during_start_up_stops_it_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    stopper = stop_when(lambda: signal.getsignal(signal.SIGTERM) is not before)
    assert embedded.main([]) == 0
    stopper.join()
    assert "DATABASE_URL=postgresql+asyncpg://" in capsys.readouterr().out


def test_a_server_with_copied_binaries_starts_again_after_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copy lives in the server's directory, which `stop()` deletes: the next `start()` must
    copy again from the original installation, not look for the deleted copy."""
    monkeypatch.setattr(EmbeddedPostgres, "_run_ok", lambda self, *cmd: cmd[0] == "test")
    server = as_another_user(EmbeddedPostgres())
    original = server.binaries
    for _ in range(2):
        with server:
            assert server._bindir.is_relative_to(server.directory)
            assert query(server, "SELECT 1") == 1
        assert server.binaries == original


def test_the_command_line_can_start_a_server_that_trusts_everyone(tmp_path: Path) -> None:
    """`--auth trust`, as the official image with POSTGRES_HOST_AUTH_METHOD=trust: the URL has no
    password, and a wrong one is let in too."""
    url_file = tmp_path / "url"
    stopper = stop_when(url_file.exists)
    assert embedded.main(["--auth", "trust", "--url-file", str(url_file)]) == 0
    stopper.join()
    assert url_file.read_text().startswith("postgresql+asyncpg://postgres@127.0.0.1:")


def test_trust_authentication_lets_a_wrong_password_in(open_dir: Path) -> None:
    with EmbeddedPostgres(base_dir=open_dir, auth="trust") as server:
        server.password = "not-the-password"
        assert query(server, "SELECT current_user") == "postgres"


def test_tls_needs_a_certificate_a_key_and_a_build_with_openssl(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="both ssl_cert_file and ssl_key_file"):
        EmbeddedPostgres(ssl_cert_file=tmp_path / "server.crt")
    pgserver = find_binaries()
    assert not pgserver.supports_tls
    with pytest.raises(EmbeddedPostgresError, match=r"OpenSSL; pgserver .* is not \(Debian's"):
        EmbeddedPostgres(
            pgserver, ssl_cert_file=tmp_path / "server.crt", ssl_key_file=tmp_path / "server.key"
        )
    assert not Binaries(tmp_path, "no pg_config here").supports_tls


@needs_system_postgres
def test_tls_files_are_the_server_users_own(open_dir: Path) -> None:
    """Copied into the data directory, mode 0600 and owned by the user the server runs as
    (tests/test_tls.py starts such a server and connects to it)."""
    for name in ("server.crt", "server.key"):
        (open_dir / name).write_text(name)
    server = as_another_user(
        EmbeddedPostgres(
            find_binaries(SYSTEM_BINDIRS[-1]),
            ssl_cert_file=open_dir / "server.crt",
            ssl_key_file=open_dir / "server.key",
        )
    )
    data = open_dir / "data"
    data.mkdir()
    assert server._install_tls_files(data) == [
        "ssl = on",
        "ssl_cert_file = 'dblayer_ssl_cert_file'",
        "ssl_key_file = 'dblayer_ssl_key_file'",
    ]
    key = (data / "dblayer_ssl_key_file").stat()
    assert (key.st_mode & 0o777, key.st_uid) == (0o600, server._owner.pw_uid)  # type: ignore[union-attr]
    server._owner = None  # not root: the server runs as we do, the files stay ours
    (data / "dblayer_ssl_key_file").unlink()
    server._install_tls_files(data)
    assert (data / "dblayer_ssl_key_file").stat().st_uid == os.getuid()
