"""dblayer.pgbouncer: PgBouncer started in front of the run's server, and always stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import URL, make_url, text

from dblayer import pgbouncer as module
from dblayer.engine import create_engine
from dblayer.pgbouncer import NOT_INSTALLED, PgBouncer, PgBouncerError, find_pgbouncer, for_server
from dblayer.settings import Driver, get_settings
from dblayer.testing import connect
from tests.databases import Databases, Server
from tests.pgbouncer import require_pgbouncer


def test_config_is_transaction_mode_on_loopback_with_a_wildcard(tmp_path: Path) -> None:
    bouncer = PgBouncer(
        "127.0.0.1",
        5999,
        users={'we"ird': "SCRAM-SHA-256$4096:abc"},
        port=6001,
        settings={"default_pool_size": "3"},
        executable=Path("/bin/false"),
    )
    ini = bouncer.config(tmp_path)
    assert "[databases]\n* = host=127.0.0.1 port=5999\n" in ini
    for line in [
        "listen_addr = 127.0.0.1",
        "listen_port = 6001",
        "auth_type = scram-sha-256",
        "pool_mode = transaction",
        'admin_users = we"ird',
        "default_pool_size = 3",
        f"logfile = {tmp_path / 'pgbouncer.log'}",
    ]:
        assert f"\n{line}\n" in ini
    assert repr(bouncer) == "PgBouncer(127.0.0.1:5999, stopped)"
    assert module._quote('we"ird') == '"we""ird"'


def test_trust_where_the_url_has_no_password() -> None:
    require_pgbouncer()
    bouncer = for_server(make_url("postgresql://app@127.0.0.1:5999/app"))
    assert (bouncer.users, bouncer.auth_type) == ({"app": ""}, "trust")


def test_a_url_with_a_password_authenticates_with_the_servers_verifier(server: Server) -> None:
    """Whatever the server's own authentication (a trusting one too): with a password in the
    URL, PgBouncer checks SCRAM against the verifier the server keeps for the role."""
    require_pgbouncer()
    url = server.admin_url.set(password=server.admin_url.password or "unused")
    bouncer = for_server(url)
    assert bouncer.auth_type == "scram-sha-256"
    username = url.username or "postgres"
    assert set(bouncer.users) <= {username}
    assert all(secret.startswith("SCRAM-SHA-256$") for secret in bouncer.users.values())


def test_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(module, "_SEARCH_PATH", ())
    with pytest.raises(PgBouncerError) as caught:
        find_pgbouncer(str(tmp_path))
    assert (
        str(caught.value)
        == NOT_INSTALLED
        == ("PgBouncer is not installed: apt-get install pgbouncer (Debian, Ubuntu)")
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("REQUIRE_PGBOUNCER_TEST", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install pgbouncer"):
        require_pgbouncer()
    monkeypatch.setenv("REQUIRE_PGBOUNCER_TEST", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install pgbouncer"):
        require_pgbouncer()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_the_engine_connects_through_it(
    pgbouncer: PgBouncer, databases: Databases, fresh_database: str, driver: Driver
) -> None:
    """SCRAM from the client to PgBouncer, and from PgBouncer to the server with the client's
    proof: no password written anywhere."""
    url = pgbouncer.url(databases.url(fresh_database, driver))
    assert url.port == pgbouncer.port
    settings = get_settings(
        database_url=url.render_as_string(hide_password=False), db_external_pooler=True
    )
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_database()")) == fresh_database
    finally:
        await engine.dispose()
    assert pgbouncer.start() is pgbouncer  # a second start: the same, still running
    assert repr(pgbouncer).endswith(f"port={pgbouncer.port})")


def test_stopped_after_an_error_in_the_block(server: Server) -> None:
    require_pgbouncer()
    directories: list[Path | None] = []
    b = for_server(server.admin_url)
    with pytest.raises(RuntimeError, match="the block failed"), b:
        directories.append(b._dir)
        raise RuntimeError("the block failed")
    assert not b.running
    assert directories[0] is not None
    assert not directories[0].exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=b.port, connect_timeout=2)
    b.stop()  # twice: nothing to do


def test_a_refused_config_fails_in_one_line_and_leaves_nothing(server: Server) -> None:
    require_pgbouncer()
    bouncer = for_server(server.admin_url, settings={"pool_mode": "sometimes"})
    with pytest.raises(
        PgBouncerError,
        match=r'^pgbouncer exited: ERROR invalid value "sometimes" for parameter pool_mode',
    ):
        bouncer.start()
    assert not bouncer.running
    assert bouncer._dir is None


def test_a_port_that_never_opens_times_out(server: Server) -> None:
    require_pgbouncer()
    bouncer = for_server(server.admin_url)
    with pytest.raises(PgBouncerError, match=r"did not listen on port \d+ in 0 s"):
        bouncer.start(timeout=0)
    assert not bouncer.running


def test_last_line_without_a_log(tmp_path: Path) -> None:
    assert module._last_line(tmp_path) == "(no log)"
    (tmp_path / "pgbouncer.log").write_text("LOG one\nLOG two\n\n")
    assert module._last_line(tmp_path) == "LOG two"


def _cli(url: str) -> subprocess.Popen[str]:
    """`python -m dblayer.pgbouncer`, the server's URL in its environment, not on its command
    line (where `ps` would show the password)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dblayer.pgbouncer"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "DATABASE_URL": url},
    )


@pytest.mark.usefixtures("subprocess_coverage")
def test_main_runs_until_ctrl_c(server: Server) -> None:
    require_pgbouncer()
    url = server.admin_url.set(drivername="postgresql+psycopg")
    with _cli(url.render_as_string(hide_password=False)) as process:
        _talk_and_interrupt(process, url)


def _talk_and_interrupt(process: subprocess.Popen[str], url: URL) -> None:
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("DATABASE_URL=postgresql+psycopg://")
        through = make_url(line.removeprefix("DATABASE_URL="))
        if url.password is not None:  # a trusting server's URL has none to hide
            assert str(url.password) not in line  # the URL printed without the password
            assert through.password == "***"
        with psycopg.connect(
            host=through.host,
            port=through.port,
            user=through.username,
            password=url.password,
            dbname="postgres",
            prepare_threshold=None,
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM first, so that it stops its PgBouncer and removes its files; SIGKILL only if it
    does not exit."""
    if process.poll() is None:  # pragma: no cover - only when the test failed
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_killed_cli_takes_its_pgbouncer_with_it(server: Server) -> None:
    """SIGKILL leaves the CLI no chance to stop PgBouncer: PgBouncer gets SIGTERM from the
    kernel when its parent dies (PR_SET_PDEATHSIG), and exits."""
    require_pgbouncer()
    url = server.admin_url.set(drivername="postgresql+psycopg")
    through = url
    with _cli(url.render_as_string(hide_password=False)) as process:
        try:
            assert process.stdout is not None
            through = make_url(process.stdout.readline().strip().removeprefix("DATABASE_URL="))
            assert through.port is not None
            socket.create_connection(("127.0.0.1", through.port), timeout=2).close()
            process.kill()
            process.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", through.port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.05)  # pragma: no cover - PgBouncer exits at once
            else:  # pragma: no cover - only when the test fails
                pytest.fail("PgBouncer still listens after its CLI was killed")
        finally:
            _stop(process)
            # What a killed CLI cannot remove: its temporary directory.
            for ini in Path(tempfile.gettempdir()).glob("dblayer-pgbouncer-*/pgbouncer.ini"):
                if f"\nlisten_port = {through.port}\n" in ini.read_text():
                    shutil.rmtree(ini.parent)


def test_main_says_why_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require_pgbouncer()
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@127.0.0.1:1/db")
    assert module.main([]) == 1
    err = capsys.readouterr().err
    assert "secret" not in err
    assert "127.0.0.1" in err
    assert os.linesep not in err.strip()


def test_main_without_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVER_URL", raising=False)
    assert module.main(["--url-from", "SERVER_URL"]) == 1
    assert capsys.readouterr().err == (
        "SERVER_URL is not set: the server's URL, a superuser's (its password is read)\n"
    )


def test_main_needs_a_superuser(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It reads the password verifier in pg_authid, which only a superuser may."""
    require_pgbouncer()
    role = f"not_super_{os.getpid()}"
    admin = server.admin_url
    with connect(admin.set(database="postgres")) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'not-super-secret'")
        try:
            url = admin.set(username=role, password="not-super-secret", database="postgres")
            monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
            assert module.main([]) == 1
        finally:
            conn.execute(f"DROP ROLE {role}")
    assert capsys.readouterr().err == (
        f"{role} may not read pg_authid: python -m dblayer.pgbouncer needs a superuser's URL\n"
    )
