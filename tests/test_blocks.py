"""The harness itself: each check must be able to fail, or a green run proves nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.outcomes import Failed
from pytest_examples import CodeExample, EvalExample

from dblayer.settings import DRIVERS
from tests.blocks import (
    CONSOLE_UPDATES,
    FenceSettings,
    apply_console_updates,
    find_console_blocks,
    normalise,
    ruff_format,
    run_block,
)


def test_normalise_keeps_what_matters() -> None:
    assert normalise("ok: PostgreSQL 16.2") == normalise("ok: PostgreSQL 15.18 (Debian 15.18-0)")
    assert normalise("took 12 ms") == normalise("took 3.5s")
    assert normalise("127.0.0.1:5432/app") == normalise("127.0.0.1:40001/app")
    # Port 1 is the "connection refused" example: it is content, not noise.
    assert normalise("127.0.0.1:1/app") != normalise("127.0.0.1:2/app")
    assert normalise("ok: PostgreSQL 16.2") != normalise("error: PostgreSQL 16.2")
    # The TLS server of needs="tls" blocks is reached by name; its OpenSSL picks the version.
    assert normalise("localhost:5432/app") == normalise("localhost:40001/app")
    assert normalise("ssl: TLSv1.3") == normalise("ssl: TLSv1.2")
    assert normalise("ssl: TLSv1.3") != normalise("ssl: TLSv1.1")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ('{.python test="skip"}', "needs reason="),
        ('{.python drivers="asyncpg"}', "needs reason="),
        ('{.python test="maybe" reason="x"}', 'only takes "skip"'),
        ('{.python drivers="psycopg2" reason="x"}', "names none of"),
        ('{.python colour="red"}', "unknown fence setting"),
        ('{.python needs="superuser"}', "needs= takes"),
        ('{.python needs="ssl"}', "needs= takes"),
        ('python test="skip" reason="x"', "in braces"),
        ('{.python file="../outside.py"}', "relative path inside the project"),
        ('{.python file="/etc/passwd"}', "relative path inside the project"),
        ('{.python file="tests/test_a.py" title="tests/test_b.py"}', "another name"),
    ],
)
def test_fence_settings_are_checked(prefix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FenceSettings.parse(prefix, "page.md:1")


def test_fence_settings() -> None:
    assert not FenceSettings.parse("python", "x").exempt
    assert not FenceSettings.parse('{.python title="a.py"}', "x").exempt
    only = FenceSettings.parse('{.python drivers="psycopg" reason="psycopg tab"}', "x")
    assert (only.drivers, only.exempt, only.reason) == (("psycopg",), True, "psycopg tab")
    assert FenceSettings.parse('{.console test="skip" reason="docker"}', "x").skip
    needs = FenceSettings.parse('{.python needs="password-auth"}', "x")
    assert (needs.needs, needs.exempt) == (("password-auth",), False)
    tls = FenceSettings.parse('{.python needs="tls"}', "x")  # no reason: it runs, elsewhere
    assert (tls.needs, tls.exempt) == (("tls",), False)
    both = FenceSettings.parse('{.console needs="tls password-auth"}', "x")
    assert both.needs == ("tls", "password-auth")
    replica = FenceSettings.parse('{.python needs="replica"}', "x")  # a primary with a replica
    assert (replica.needs, replica.exempt, replica.drivers) == (("replica",), False, DRIVERS)


def test_fence_needs_pgbouncer() -> None:
    """`needs="pgbouncer"`: the block runs (no reason asked) through PgBouncer."""
    bouncer = FenceSettings.parse('{.python needs="pgbouncer"}', "x")
    assert (bouncer.needs, bouncer.exempt) == (("pgbouncer",), False)
    console = FenceSettings.parse('{.console needs="pgbouncer"}', "x")
    assert console.needs == ("pgbouncer",)
    with pytest.raises(ValueError, match="needs= takes"):
        FenceSettings.parse('{.python needs="pgbouncr"}', "x")


def page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text)
    return path


def test_console_blocks_are_parsed_and_rewritten(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "Intro\n\n```console\n$ echo a \\\n    b\na b\n$ true\n```\n\n"
        '=== "Tab"\n\n    ```console\n    $ echo indented\n    old\n    ```\n',
    )
    first, second = find_console_blocks(tmp_path)
    assert [(c.line, c.expected) for c in first.commands] == [("echo a b", "a b"), ("true", "")]
    assert second.indent == 4
    CONSOLE_UPDATES[(path, 1)] = second.render(["indented"])
    CONSOLE_UPDATES[(path, 0)] = first.render(["a b", ""])
    assert apply_console_updates() == [f"{second}"]  # the first one did not change
    assert "    $ echo indented\n    indented\n    ```" in path.read_text()
    assert "$ echo a \\\n    b\na b\n$ true\n```" in path.read_text()


def test_a_console_block_must_start_with_a_command(tmp_path: Path) -> None:
    page(tmp_path, "```console\noutput without a command\n```\n")
    with pytest.raises(ValueError, match="starts with a `\\$ ` command"):
        list(find_console_blocks(tmp_path))


def example(source: str) -> CodeExample:
    created: CodeExample = CodeExample.create(source, path=Path("docs/page.md"), start_line=10)
    return created


def test_a_wrong_printed_output_fails(eval_example: EvalExample) -> None:
    run_block(eval_example, example("print(1 + 1)\n#> 2\n"), {"__name__": "__main__"}, "check")
    for wrong in ("print(1 + 1)\n#> 3\n", "print(1 + 1)\n"):
        with pytest.raises(Failed, match="Print output changed code"):
            run_block(eval_example, example(wrong), {"__name__": "__main__"}, "check")


def test_a_varying_version_does_not_fail(eval_example: EvalExample) -> None:
    source = 'print("PostgreSQL 15.18")\n#> PostgreSQL 16.2\n'
    run_block(eval_example, example(source), {"__name__": "__main__"}, "check")


def test_a_block_that_raises_fails_with_its_page_lines(eval_example: EvalExample) -> None:
    """One line for the error, one per frame of the block, numbered as on the page."""
    source = "def f():\n    raise ValueError('no')\n\n\nf()\n"
    with pytest.raises(Failed) as failed:
        run_block(eval_example, example(source), {"__name__": "__main__"}, "check")
    assert str(failed.value).splitlines() == [
        "docs/page.md:10-15 raised ValueError: no",
        "  page.md:15 in <module>",
        "  page.md:12 in f",
    ]


def test_updating_rewrites_only_a_real_change(eval_example: EvalExample) -> None:
    """`make update-examples` queues the new output; a changed version alone is left as it is."""
    module: dict[str, object] = {"__name__": "__main__"}
    same = example('print("PostgreSQL 15.18")\n#> PostgreSQL 16.2\n')
    run_block(eval_example, same, module, "update")
    assert same.source.endswith("#> PostgreSQL 16.2\n")
    changed = example("print(1 + 1)\n#> 3\n")
    run_block(eval_example, changed, module, "update")
    assert changed.source == "print(1 + 1)\n#> 2\n"
    only_run = example("print(1 + 1)\n#> 3\n")
    run_block(eval_example, only_run, module, None)
    assert only_run.source == "print(1 + 1)\n#> 3\n"


def test_unformatted_blocks_fail(eval_example: EvalExample) -> None:
    ruff_format(example("x = 1\nprint(x)\n#> 1\n"), eval_example, update=False)
    with pytest.raises(Failed, match="not ruff-formatted"):
        ruff_format(example("x=1\n"), eval_example, update=False)


FILES_PAGE = """\
```{.text file="notes/hello.txt"}
first
```

```console
$ cat notes/hello.txt
first
```

```{.text file="notes/hello.txt"}
second
```

```console
$ cat notes/hello.txt
second
$ pwd
/home/you/project
```
"""


def test_files_on_a_page_are_there_for_the_console_blocks_after_them(tmp_path: Path) -> None:
    """A later file block of the same name replaces the earlier one, from where it stands."""
    first, second = find_console_blocks(page(tmp_path, FILES_PAGE).parent)
    for block in (first, second):
        project = tmp_path / f"project-{block.start_line}"
        project.mkdir()
        block.write_files(project)
        block.run({"PATH": "/usr/bin:/bin"}, project, check=True)


def test_a_file_that_differs_from_what_the_output_shows_fails(tmp_path: Path) -> None:
    """The planted fault: the page's file is not what produced the output it shows."""
    first, _ = find_console_blocks(
        page(tmp_path, FILES_PAGE.replace("first\n```", "1st\n```", 1)).parent
    )
    project = tmp_path / "project"
    project.mkdir()
    first.write_files(project)
    with pytest.raises(Failed, match=r"`cat notes/hello.txt` printed \(exit 0\):\n1st"):
        first.run({"PATH": "/usr/bin:/bin"}, project, check=True)


def test_a_file_that_no_console_block_runs_fails(tmp_path: Path) -> None:
    """The planted fault: a file shown after the page's last console block is never run."""
    text = FILES_PAGE + '\n```{.python file="tests/test_never_run.py"}\nassert False\n```\n'
    with pytest.raises(ValueError, match=r"page\.md:21: a file with no console block after it"):
        list(find_console_blocks(page(tmp_path, text).parent))
