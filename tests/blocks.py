"""The code blocks of the pages: which run, with which settings, and how output is compared.

Python blocks are found by pytest-examples. Console blocks (```` ```console ````) are parsed here:
each line starting with `$ ` is a command, the lines after it are its expected output.
A fence may carry settings, each needing a `reason="…"`:

* `drivers="asyncpg"` runs the block under that driver only (e.g. the asyncpg tab of a pair);
* `test="skip"` does not run it at all (counted and listed in the run's summary).

`needs="password-auth"` (no reason needed) marks a block that shows a wrong password refused: on
a server with trust authentication it is skipped with one line, not exempted.

`needs="tls"` (no reason needed) runs the block on a server with TLS on: see `FenceSettings`.

`needs="pgbouncer"` (no reason needed) runs the block through PgBouncer: see `FenceSettings`.
`needs="replica"` (no reason needed) runs it on a primary with a streaming replica: ditto.

Writing blocks that pytest-examples can keep up to date (learned the hard way):

* prints must run in the order they stand in the source (it inserts the outputs in that order);
* a print that runs more than once (in a loop, in a function called twice) must print one short
  line each time (under about 88 characters), or `make update-examples` stops being idempotent.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from pytest_examples import CodeExample, EvalExample, find_examples
from ruff.__main__ import find_ruff_bin  # type: ignore[import-untyped]

from dblayer.settings import DRIVERS, Driver
from tests.paths import DOCS, ROOT

_FENCE = re.compile(r"(^ *```)( *)(.*?)\n(.+?)\1", flags=re.M | re.S)
_SETTING = re.compile(r'([\w-]+)="([^"]*)"')
_KNOWN = {"test", "drivers", "reason", "title", "needs", "file"}
_FILE = re.compile(r"(?:[\w.-]+/)*[\w.-]+")  # a relative path: no `..`, no leading `/`
# What a reader's server may not offer (see the docstring).
_NEEDS = {"password-auth", "tls", "pgbouncer", "replica", "ipv6-localhost", "client-check"}

# What legitimately differs between runs, replaced on both sides before comparing.
_NORMALISE = [
    # The server's version: the pages are recorded on 16, CI also runs them on 15.
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)?"), "<time>"),
    (re.compile(r"PostgreSQL \d+(?:\.\d+)*(?: \([^)]*\))?"), "PostgreSQL <version>"),
    (re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s)\b"), "<duration>"),
    (re.compile(r"(?:/tmp|/dev/shm)/[\w./-]+"), "<tmp>"),
    (re.compile(r"127\.0\.0\.1:(?!1\b)\d+"), "127.0.0.1:<port>"),  # port 1 is the refused one
    (re.compile(r"\blocalhost:\d+"), "localhost:<port>"),  # the TLS server's (needs="tls")
    (re.compile(r"\bTLSv1\.[23]\b"), "TLSv1.<minor>"),  # what the server's OpenSSL negotiates
    (re.compile(r"__asyncpg_stmt_[0-9a-f]+__"), "__asyncpg_stmt_<n>__"),  # a per-process counter
]


def normalise(text: str) -> str:
    """Replace what varies between runs (versions, durations, temp paths) with placeholders."""
    for pattern, placeholder in _NORMALISE:
        text = pattern.sub(placeholder, text)
    return text


@dataclass(frozen=True)
class FenceSettings:
    """The `key="value"` settings of a fence, checked: every exemption has a reason.

    `needs="tls"` (no reason needed) runs the block (python or console) on a server with TLS on
    instead (`tests/tls.py`; its own even with TEST_DATABASE_URL, since TLS cannot be switched on in
    someone's server), in a fresh migrated database there named `app`, with the environment of a
    reader's deployment that has a CA and a client certificate:

    * `DATABASE_URL`: the superuser (with its password) on `app`, at `localhost`, the one name the
      server's certificate has (connecting to 127.0.0.1 with `verify-full` is the wrong host name);
      no `sslmode`: the block says which it uses;
    * `DB_SSLROOTCERT`: the CA that signed the server's certificate;
    * `DB_SSLCERT`, `DB_SSLKEY`: a client certificate (and its key) for the role `app`, which the
      block creates if it shows certificate authentication: the server's `pg_hba.conf` asks any role
      connecting over TLS to the database of its own name for a certificate with its name as CN;
    * `HOME`: an empty directory, so libpq's default `~/.postgresql/root.crt` is never the
      developer's; `PGSSLMODE` and the other `PGSSL…` variables unset.

    The database and the roles named after it are dropped after the block. The server is one per
    xdist worker, started when its first such block runs, so the fixed name `app` never clashes:
    the two drivers' runs of a block, when at once, are on two servers. Where no PostgreSQL built
    with OpenSSL is found the block is skipped with one line (REQUIRE_TLS_TEST makes it a failure).

    `needs="pgbouncer"` (no reason needed) runs the block (python or console) in its own fresh
    database as usual, with `DATABASE_URL` pointing at it through PgBouncer in transaction mode
    (`dblayer.pgbouncer`; one per xdist worker, started when its first such block runs, in front
    of the run's server, every database reachable through its `*` wildcard) and
    `MIGRATION_DATABASE_URL` at it on the server directly. Where PgBouncer is not installed the
    block is skipped with one line (REQUIRE_PGBOUNCER_TEST makes it a failure).
    `needs="replica"` (no reason needed) runs the block on a primary with a streaming replica
    (`tests/replica.py`; the run's own pair, one per xdist worker, even with TEST_DATABASE_URL),
    in a fresh migrated database on the primary which the replica has replayed before the block
    starts: `DATABASE_URL` names it on the primary, `DATABASE_REPLICA_URL` on the replica, both as
    the superuser of this dedicated pair (so a block may pause the replica's WAL replay; the
    harness resumes it before the next block).
    `needs="ipv6-localhost"` (no reason needed) runs the block only where `localhost` resolves to
    both `::1` and `127.0.0.1` (`tests/localhost.py`), else skips it with one line
    (REQUIRE_IPV6_LOCALHOST_TEST makes that a failure).
    `needs="client-check"` (no reason needed) runs the block only on a server whose
    `client_connection_check_interval` is off by default and may be turned on (PostgreSQL 14+
    on Linux and other systems that report a closed socket), else skips it with one line
    (`tests/databases.py`).
    """

    drivers: tuple[Driver, ...] = DRIVERS
    skip: bool = False
    reason: str = ""
    needs: tuple[str, ...] = ()  # what the server must offer, else the block is skipped
    file: str = ""  # a file of the reader's project, written for the console blocks after it

    @classmethod
    def parse(cls, prefix: str, where: str) -> FenceSettings:
        values = dict(_SETTING.findall(prefix))
        if values and not prefix.startswith("{"):
            # Without braces, superfences does not see a fence at all and prints it as text.
            raise ValueError(
                f'{where}: write fence settings in braces: ``` {{.python key="value"}}'
            )
        unknown = set(values) - _KNOWN
        if unknown:
            raise ValueError(f"{where}: unknown fence setting(s) {sorted(unknown)}")
        restricted = "test" in values or "drivers" in values
        reason = values.get("reason", "").strip()
        if restricted and not reason:
            raise ValueError(f'{where}: a fence setting needs reason="why" beside it')
        if values.get("test", "skip") != "skip":
            raise ValueError(f'{where}: test= only takes "skip"')
        drivers = tuple(d for d in DRIVERS if d in values.get("drivers", " ".join(DRIVERS)).split())
        if not drivers:
            raise ValueError(f"{where}: drivers= names none of {DRIVERS}")
        needs = tuple(values.get("needs", "").split())
        if set(needs) - _NEEDS:
            raise ValueError(f"{where}: needs= takes {sorted(_NEEDS)}")
        file = values.get("file", "")
        if file and values.get("title", file) != file:
            raise ValueError(f"{where}: title= shows another name than file= writes")
        if file and (not _FILE.fullmatch(file) or ".." in file.split("/")):
            raise ValueError(
                f"{where}: file= takes a relative path inside the project, not {file!r}"
            )
        return cls(
            drivers=drivers,
            skip=values.get("test") == "skip",
            reason=reason,
            needs=needs,
            file=file,
        )

    @property
    def exempt(self) -> bool:
        return self.skip or self.drivers != DRIVERS


@dataclass
class Command:
    line: str  # what follows `$ `, continuation lines joined
    raw: str  # the command as the page writes it, `$ ` and continuation lines included
    expected: str  # the output the page shows, without trailing blank lines


@dataclass(frozen=True)
class FileBlock:
    """A block whose fence names a file (`file="tests/test_users.py"`): a file of the reader's
    project. The console blocks after it on its page run in a scratch project that holds it."""

    target: str  # the path inside the project
    body: str
    where: str  # page:line, for messages


@dataclass
class ConsoleBlock:
    path: Path
    start_line: int
    end_line: int
    prefix: str
    start_index: int
    end_index: int
    indent: int = 0
    commands: list[Command] = field(default_factory=list)
    files: list[FileBlock] = field(default_factory=list)  # earlier on the page; later ones win

    def run(self, env: dict[str, str], project: Path, *, check: bool) -> list[str]:
        """Run the commands in `project`, in turn; their outputs, as a reader's checkout would
        show them. With `check`, the first output that differs from the page's fails."""
        outputs = []
        for command in self.commands:
            result = subprocess.run(
                ["bash", "-c", command.line],
                env=env,
                cwd=project,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # interleaved, as a terminal shows them
                text=True,
                timeout=120,
            )
            # The scratch path as a reader's own checkout (alembic prints absolute ones).
            output = result.stdout.rstrip().replace(str(project), READER_PROJECT)
            outputs.append(output)
            if check and normalise(output) != normalise(command.expected):
                pytest.fail(
                    f"{self}: `{command.line}` printed (exit {result.returncode}):\n{output}\n"
                    f"the page shows:\n{command.expected}",
                    pytrace=False,
                )
        return outputs

    def write_files(self, project: Path) -> None:
        """Put the page's files, as far as this block, into the scratch project."""
        for file in self.files:
            target = project / file.target
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.body, "utf-8")

    def __str__(self) -> str:
        path = (
            self.path.relative_to(DOCS.parent)
            if self.path.is_relative_to(DOCS.parent)
            else self.path
        )
        return f"{path}:{self.start_line}-{self.end_line}"

    @property
    def settings(self) -> FenceSettings:
        return FenceSettings.parse(self.prefix, str(self))

    def render(self, outputs: list[str]) -> str:
        """The block's body with each command's output replaced (for `make update-examples`)."""
        parts = []
        for command, output in zip(self.commands, outputs, strict=True):
            parts.append(f"{command.raw}\n" + (output.rstrip() + "\n" if output.strip() else ""))
        return textwrap.indent("".join(parts), " " * self.indent)


_SNIPPET_LINE = re.compile(r'^\s*--8<-- "[^"]+"\s*$')


def python_blocks(root: Path = DOCS) -> tuple[list[CodeExample], list[CodeExample]]:
    """(programs, includes): a block made only of `--8<--` lines shows code from src/, which
    mkdocs --strict checks and the module's own tests run; a block that names a file (see
    `FileBlock`) is run by the console blocks after it; every other block is a program."""
    programs, includes, _ = _python_blocks(root)
    return programs, includes


def python_file_blocks(root: Path = DOCS) -> list[CodeExample]:
    """The Python blocks that are files of a reader's project: linted and formatted like the
    programs, run by the console blocks that follow them."""
    return _python_blocks(root)[2]


def _python_blocks(
    root: Path,
) -> tuple[list[CodeExample], list[CodeExample], list[CodeExample]]:
    found = sorted(find_examples(root), key=lambda b: (str(b.path), b.start_line))
    programs: list[CodeExample] = []
    includes: list[CodeExample] = []
    files: list[CodeExample] = []
    for block in found:
        if all(_SNIPPET_LINE.match(x) for x in block.source.strip().splitlines()):
            includes.append(block)
        elif 'file="' in block.prefix:
            files.append(block)
        else:
            programs.append(block)
    return programs, includes, files


def expected_docs_tests(root: Path = DOCS) -> int:
    """How many docs tests a complete run has: every block under every driver."""
    programs, _ = python_blocks(root)
    return len(DRIVERS) * (len(programs) + len(list(find_console_blocks(root))))


# (page, ordinal of the console block in it) -> new body; written by `apply_console_updates`.
CONSOLE_UPDATES: dict[tuple[Path, int], str] = {}


def apply_console_updates() -> list[str]:
    """Write queued console outputs into the pages; the pages' other edits are already on disk."""
    written = []
    for path in sorted({path for path, _ in CONSOLE_UPDATES}):
        text = path.read_text("utf-8")
        blocks = [b for b in find_console_blocks(path.parent) if b.path == path]
        for ordinal, block in reversed(list(enumerate(blocks))):
            body = CONSOLE_UPDATES.get((path, ordinal))
            current = text[block.start_index : block.end_index]
            if body is not None and normalise(body) != normalise(current):  # not just timestamps
                text = text[: block.start_index] + body + text[block.end_index :]
                written.append(str(block))
        path.write_text(text, "utf-8")
    CONSOLE_UPDATES.clear()
    return written


def find_console_blocks(root: Path = DOCS) -> Iterator[ConsoleBlock]:
    for path in sorted(root.rglob("*.md")):
        text = path.read_text("utf-8")
        files: list[FileBlock] = []
        used = 0  # how many of the page's files a console block after them runs
        for match in _FENCE.finditer(text):
            prefix = match.group(3).strip()
            start_line = text[: match.start()].count("\n") + 1
            body = textwrap.dedent(match.group(4))
            where = f"{path.name}:{start_line}"
            if 'file="' in prefix:
                target = FenceSettings.parse(prefix, where).file
                files.append(FileBlock(target=target, body=body, where=where))
                continue
            if not prefix.lstrip("{ .").startswith("console"):
                continue
            indent = len(match.group(1)) - 3
            start_index = match.start(4)
            block = ConsoleBlock(
                path=path,
                start_line=start_line,
                end_line=start_line + body.count("\n") + 1,
                prefix=prefix,
                start_index=start_index,
                end_index=start_index + len(match.group(4)),
                indent=indent,
                commands=list(_parse_commands(body, where)),
                files=list(files),
            )
            if block.commands:
                used = len(files)
                yield block
        if len(files) > used:
            raise ValueError(
                f"{files[used].where}: a file with no console block after it is never run"
            )


def _parse_commands(body: str, where: str) -> Iterator[Command]:
    lines = body.splitlines()
    index = 0
    if lines and not lines[0].startswith("$ "):
        raise ValueError(f"{where}: a console block starts with a `$ ` command")
    while index < len(lines):
        raw = [lines[index]]
        command = lines[index].removeprefix("$ ")
        while command.endswith("\\") and index + 1 < len(lines):
            index += 1
            raw.append(lines[index])
            command = command[:-1].rstrip() + " " + lines[index].strip()
        index += 1
        output: list[str] = []
        while index < len(lines) and not lines[index].startswith("$ "):
            output.append(lines[index])
            index += 1
        yield Command(line=command, raw="\n".join(raw), expected="\n".join(output).rstrip())


# pytest as in a reader's project (PYTEST_ADDOPTS): without the plugins only this suite installs
# for itself; they print nothing there, but loading them takes a second and a half per run.
READERS_PYTEST = " ".join(
    f"-p no:{plugin}"
    for plugin in ("hypothesispytest", "schemathesis", "pytest_alembic", "examples", "anyio")
)
# A console block's working directory as its output shows it: a reader's checkout.
READER_PROJECT = "/home/you/project"
# The file a Python block is run from, as its output shows it: what a reader who saved the block
# and ran it would see (pytest-examples would name it after the page: `pooling_536_567.py`).
BLOCK_FILE = "main.py"


def lay_out_checkout(directory: Path) -> None:
    """`directory` laid out like a checkout, where a reader runs a page's code: alembic.ini beside
    src/, and no `.env`."""
    shutil.copy(ROOT / "alembic.ini", directory)
    shutil.copytree(ROOT / "src", directory / "src", ignore=shutil.ignore_patterns("__pycache__"))


def name(block: CodeExample | ConsoleBlock) -> str:
    """`docs/page.md:12-30`, whatever the working directory (tests run in their own)."""
    path = block.path.relative_to(ROOT) if block.path.is_relative_to(ROOT) else block.path
    return f"{path}:{block.start_line}-{block.end_line}"


def run_block(
    eval_example: EvalExample,
    example: CodeExample,
    module: dict[str, object],
    mode: Literal["check", "update"] | None,
) -> None:
    """Run a Python block as `main.py` with `print` recorded, then by `mode`: "check" fails when
    what it printed differs from its `#>` lines, "update" queues the page's new text, None only
    runs it. Only a difference beyond what `normalise` treats as varying counts. The block's own
    error fails the test in one message with the page's line numbers."""
    script = eval_example.tmp_path / BLOCK_FILE

    def write_as_main(example: CodeExample) -> Path:
        script.write_text(example.source)
        return script

    eval_example._write_file = write_as_main  # type: ignore[method-assign]
    example.test_id = eval_example._test_id
    failure: str | None = None
    try:
        printed, _ = eval_example._run(example, mode, module, True, None)
    except Exception as exc:
        failure = _describe_block_error(example, exc)
    if failure is not None:  # raised outside the `except`: the unrenderable traceback not chained
        pytest.fail(failure, pytrace=False)
    new_code = printed.updated_print_statements(example) if mode else None
    if not new_code or normalise(new_code).rstrip() == normalise(example.source).rstrip():
        return
    if mode == "update":
        example.source = new_code
        eval_example._mark_for_update(example)
    else:
        printed.check_print_statements(example)  # fails with pytest-examples' own diff


def _describe_block_error(example: CodeExample, exc: Exception) -> str:
    """The error and the block's own frames, with page line numbers.

    pytest-examples points the traceback at the page (its frames carry the page's path and line
    numbers), which pytest cannot render on Python 3.11 (an INTERNALERROR); this is the part of it
    a reader needs.
    """
    lines = [f"{name(example)} raised {type(exc).__name__}: {exc}"]
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == str(example.path):
            lines.append(f"  {example.path.name}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    return "\n".join(lines)


def ruff_format(example: CodeExample, eval_example: EvalExample, update: bool) -> None:
    """`ruff format` the block; `#>` lines are protected as pytest-examples does for black."""
    protected = re.sub(r"^( *#)> ", r"\1 > ", example.source, flags=re.M)
    result = subprocess.run(
        [find_ruff_bin(), "format", "--line-length=100", "-"],  # not `python -m`: 25 ms less
        input=protected,
        capture_output=True,
        text=True,
        check=True,
    )
    formatted = re.sub(r"^( *#) > ", r"\1> ", result.stdout, flags=re.M)
    if formatted == example.source:
        return
    if not update:
        diff = "".join(
            difflib.unified_diff(
                example.source.splitlines(True), formatted.splitlines(True), "page", "ruff format"
            )
        )
        pytest.fail(f"{name(example)} is not ruff-formatted (make update-examples):\n{diff}")
    example.source = formatted
    eval_example._mark_for_update(example)
