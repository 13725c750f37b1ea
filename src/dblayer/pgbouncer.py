"""A throwaway PgBouncer in front of a PostgreSQL server: for the tests and for trying it locally.

Like `dblayer.embedded` for PostgreSQL: a generated `pgbouncer.ini` (transaction mode by default,
127.0.0.1 only, a free port, every database of the server reachable through the `*` wildcard),
its log and files in a temporary directory, removed at stop (also at exit). PgBouncer refuses to
run as root, so under root it runs as an unprivileged system user.

Authentication: with `users` as `{"name": secret}` PgBouncer checks the clients' passwords itself
(`auth_type = scram-sha-256`); the secret is the role's SCRAM verifier from `pg_authid` (see
`scram_secrets`), which PgBouncer also uses to log in to the server with the client's own proof,
so no plain password is written anywhere. In front of a server that trusts everyone, `trust`.

`python -m dblayer.pgbouncer` runs one in front of the server of `$DATABASE_URL` (a superuser's:
it reads `pg_authid`; `--url-from NAME` reads another variable) until Ctrl-C, and stops with
the program even when that is killed.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from sqlalchemy import URL, make_url

from dblayer.embedded import default_server_user, free_port, until_stopped

__all__ = ["PgBouncer", "PgBouncerError", "find_pgbouncer", "scram_secrets"]

# The one line a reader (or a test run) without PgBouncer sees.
NOT_INSTALLED = "PgBouncer is not installed: apt-get install pgbouncer (Debian, Ubuntu)"
_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


class PgBouncerError(RuntimeError):
    """PgBouncer is missing, or did not start; one line (with the end of its log)."""


def find_pgbouncer(path: str | None = None) -> Path:
    """The `pgbouncer` program: on PATH, or where Debian puts it (`/usr/sbin`, not on a user's
    PATH)."""
    search = os.pathsep.join(
        [path if path is not None else os.environ.get("PATH", ""), *_SEARCH_PATH]
    )
    found = shutil.which("pgbouncer", path=search)
    if found is None:
        raise PgBouncerError(NOT_INSTALLED)
    return Path(found)


def scram_secrets(admin_url: URL, roles: list[str]) -> dict[str, str]:
    """The roles' stored password verifiers (`pg_authid.rolpassword`), read as a superuser: what
    PgBouncer's `auth_file` takes, in place of the passwords."""
    with psycopg.connect(  # keyword arguments: no escaping, no password in an error
        host=admin_url.host,
        port=admin_url.port,
        user=admin_url.username,
        password=admin_url.password if isinstance(admin_url.password, str) else None,
        dbname=admin_url.database or "postgres",
        connect_timeout=10,
    ) as conn:
        try:
            rows = conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (roles,)
            ).fetchall()
        except psycopg.errors.InsufficientPrivilege:
            raise PgBouncerError(
                f"{admin_url.username} may not read pg_authid: "
                "python -m dblayer.pgbouncer needs a superuser's URL"
            ) from None
    return {str(name): str(secret) for name, secret in rows if secret is not None}


def _quote(value: str) -> str:
    """A value in the auth_file's double quotes (a quote is doubled)."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """Start with `start()` (or `with`), connect with `url()`, remove everything with `stop()`."""

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        users: Mapping[str, str] | None = None,
        auth_type: str = "scram-sha-256",
        pool_mode: str = "transaction",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
        executable: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.executable = executable or find_pgbouncer()
        self.server_host = server_host
        self.server_port = server_port
        self.users = dict(users or {})
        self.auth_type = auth_type
        self.pool_mode = pool_mode
        self.port = port or free_port()
        self.settings = dict(settings or {})  # more `[pgbouncer]` settings, e.g. pool sizes
        self.run_as = run_as or default_server_user()
        # Linux: the kernel sends PgBouncer SIGTERM when the thread that started it ends, even
        # killed (the CLI); not for the tests' PgBouncer, which other threads may outlive.
        self.die_with_parent = die_with_parent
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"PgBouncer({self.server_host}:{self.server_port}, {state})"

    @property
    def running(self) -> bool:
        return self._process is not None

    def url(self, server_url: URL) -> URL:
        """`server_url` (a database of the server, its user and password) through PgBouncer."""
        return server_url.set(host="127.0.0.1", port=self.port)

    # --8<-- [start:config]
    def config(self, directory: Path) -> str:
        """The generated `pgbouncer.ini`."""
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP on loopback only
            "auth_type": self.auth_type,
            "auth_file": str(directory / "userlist.txt"),
            "pool_mode": self.pool_mode,
            "admin_users": ",".join(self.users),
            "logfile": str(directory / "pgbouncer.log"),
            "pidfile": str(directory / "pgbouncer.pid"),
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        return "\n".join(lines) + "\n"
        # --8<-- [end:config]

    def start(self, timeout: float = 10) -> PgBouncer:
        """Write the files in a new temporary directory, start PgBouncer, wait for its port."""
        with self._lock:
            if self._process is not None:
                return self
            directory = Path(tempfile.mkdtemp(prefix="dblayer-pgbouncer-"))
            self._dir = directory
            atexit.register(self.stop)
            uid, gid = _ids(self.run_as)
            try:
                self._write_files(directory, uid, gid)
                output = (directory / "output.log").open("wb")  # what it says before logging
                self._process = process = subprocess.Popen(  # noqa: S603 - the pgbouncer program
                    [str(self.executable), str(directory / "pgbouncer.ini")],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C in the terminal reaches us, and we stop it cleanly.
                    start_new_session=True,
                    user=uid,
                    group=gid,
                    extra_groups=[] if os.geteuid() == 0 else None,
                    cwd=directory,
                    preexec_fn=_parent_death_signal() if self.die_with_parent else None,
                )
                output.close()  # the child has it
                self._wait_for_port(process, directory, timeout)
            except BaseException:
                self._stop()
                raise
            return self

    def stop(self) -> None:
        """Stop PgBouncer and delete its files. Safe to call twice."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()  # SIGTERM: PgBouncer closes its connections and exits
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - PgBouncer exits at once
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_files(self, directory: Path, uid: int, gid: int) -> None:
        (directory / "pgbouncer.ini").write_text(self.config(directory))
        users = "".join(f"{_quote(n)} {_quote(s)}\n" for n, s in self.users.items())
        (directory / "userlist.txt").write_text(users)
        for path in (directory, directory / "pgbouncer.ini", directory / "userlist.txt"):
            path.chmod(0o700 if path.is_dir() else 0o600)
            os.chown(path, uid, gid)

    def _wait_for_port(
        self, process: subprocess.Popen[bytes], directory: Path, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PgBouncerError(f"pgbouncer exited: {_last_line(directory)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise PgBouncerError(f"pgbouncer did not listen on port {self.port} in {timeout} s")


def _last_line(directory: Path) -> str:
    """Why PgBouncer stopped: the first error it wrote (in its log, or before it had one in its
    output), without the time stamp; else its last line."""
    lines = [
        line
        for name in ("output.log", "pgbouncer.log")
        if (directory / name).exists()
        for line in (directory / name).read_text(errors="replace").splitlines()
        if line.strip()
    ]
    errors = [m.group(0) for line in lines if (m := re.search(r"\b(?:ERROR|FATAL) .*", line))]
    return errors[0] if errors else lines[-1] if lines else "(no log)"


# prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None]:
    """For `preexec_fn`: after the fork and the change of user, before the exec, ask for SIGTERM
    at the parent's death; exit at once where the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork
    parent = os.getpid()

    def in_the_child() -> None:  # pragma: no cover - runs in the child, which coverage misses
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died during the fork
            os._exit(1)

    return in_the_child


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def for_server(url: URL, **kwargs: object) -> PgBouncer:
    """A PgBouncer in front of the server of `url` (a superuser's), for its user: SCRAM with the
    verifier read from the server, or `trust` where the URL has no password."""
    username = url.username or "postgres"
    if url.password:
        users = scram_secrets(url.set(drivername="postgresql"), [username])
        auth_type = "scram-sha-256"
    else:
        users, auth_type = {username: ""}, "trust"
    return PgBouncer(
        url.host or "127.0.0.1",
        url.port or 5432,
        users=users,
        auth_type=auth_type,
        **kwargs,  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m dblayer.pgbouncer`: PgBouncer in front of the server of `$DATABASE_URL` until
    Ctrl-C. The URL comes from the environment, not the command line, where `ps` shows it."""
    parser = argparse.ArgumentParser(prog="python -m dblayer.pgbouncer", description=__doc__)
    parser.add_argument(
        "--url-from",
        default="DATABASE_URL",
        metavar="NAME",
        help="the variable with a superuser's URL of the server (default: DATABASE_URL)",
    )
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    value = os.environ.get(args.url_from)
    if not value:
        print(
            f"{args.url_from} is not set: the server's URL, a superuser's (its password is read)",
            file=sys.stderr,
        )
        return 1
    url = make_url(value)
    try:
        bouncer = for_server(url, port=args.port, die_with_parent=True)
    except (PgBouncerError, psycopg.Error) as exc:
        print(str(exc).strip().splitlines()[0], file=sys.stderr)
        return 1
    with until_stopped() as wait, bouncer:
        shown = bouncer.url(url).render_as_string(hide_password=True)  # the same password
        print(f"DATABASE_URL={shown}", flush=True)
        wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
