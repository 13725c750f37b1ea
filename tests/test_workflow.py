"""The workflow that tests and publishes the site: linted (the GitHub workflow schema, and zizmor's
audits, offline), shaped as the project needs it, and the linters shown to catch faults.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults import plant
from tests.paths import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "docs.yml"


def _lint_workflow(workflow: Path) -> list[str]:
    """Failures of the two linters: the workflow schema, and zizmor's audits (offline)."""
    bin_dir = Path(sys.executable).parent
    commands = [
        [str(bin_dir / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows"],
        [str(bin_dir / "zizmor"), "--offline", "--config", str(ROOT / ".github" / "zizmor.yml")],
    ]
    failures = []
    for command in commands:
        result = subprocess.run(
            [*command, str(workflow)], capture_output=True, text=True, check=False
        )
        if result.returncode:
            failures.append(f"{Path(command[0]).name}:\n{result.stdout}{result.stderr}")
    return failures


def test_the_workflow_passes_its_linters() -> None:
    assert _lint_workflow(WORKFLOW) == []


def test_the_workflow_tests_every_major_then_builds_and_publishes_main_only() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    test, site, deploy = jobs["test"], jobs["site"], jobs["deploy"]
    assert test["strategy"]["matrix"]["pg"] == [14, 15, 16, 17, 18]
    service = test["services"]["postgres"]
    assert service["image"] == "postgres:${{ matrix.pg }}"
    assert "--health-cmd" in service["options"]
    assert test["env"]["TEST_DATABASE_URL"].startswith("postgresql://")
    assert test["env"]["PG"] == "${{ matrix.pg }}"  # the servers the tests start: the same major
    assert test["env"]["REQUIRE_BROWSER_TEST"]
    assert test["env"]["REQUIRE_TLS_TEST"]
    assert test["env"]["REQUIRE_PGBOUNCER_TEST"]  # installed before the tests, never skipped
    runs = [step.get("run") for step in test["steps"] if "run" in step]
    assert runs[-1] == "make test"
    assert any("apt-get install" in run and "pgbouncer" in run for run in runs[:-1])
    assert test["env"]["REQUIRE_IPV6_LOCALHOST_TEST"]  # tests/localhost.py: never skipped
    assert any("::1 localhost" in run and "/etc/hosts" in run for run in runs[:-1])
    upload = next(s for s in test["steps"] if s.get("with", {}).get("path") == ".cache/verified/")
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert upload["with"]["name"] == "verified-pg${{ matrix.pg }}"
    assert site["needs"] == "test"
    uses = [step.get("uses", "").split("@")[0] for step in site["steps"]]
    runs = [step.get("run") for step in site["steps"]]
    assert uses.index("actions/download-artifact") < runs.index("make site")
    published = next(step for step in site["steps"] if "SITE_URL" in step.get("env", {}))
    assert published["run"] == "make site"
    assert "actions/upload-pages-artifact" in uses
    # Both builds link to the repository the workflow runs in (mkdocs.yml's repo_url).
    assert site["env"]["REPO_URL"] == "${{ github.server_url }}/${{ github.repository }}"
    assert site["env"]["REPO_NAME"] == "${{ github.repository }}"
    assert "!ENV [REPO_URL," in (ROOT / "mkdocs.yml").read_text()
    assert "actions/deploy-pages" in [
        step.get("uses", "").split("@")[0] for step in deploy["steps"]
    ]
    main_only = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert deploy["needs"] == "site"
    assert deploy["if"] == main_only
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert workflow["permissions"] == {}


@pytest.mark.parametrize(
    ("old", "new", "linter"),
    [
        (
            "runs-on: ubuntu-24.04\n    timeout",
            "run-on: ubuntu-24.04\n    timeout",
            "check-jsonschema",
        ),
        (
            "      - run: make test\n",
            '      - run: make test\n      - run: echo "${{ github.event.pull_request.title }}"\n',
            "zizmor",
        ),
    ],
    ids=["misspelt key", "script injection"],
)
def test_the_workflow_linters_catch_faults(tmp_path: Path, old: str, new: str, linter: str) -> None:
    workflow = tmp_path / "docs.yml"
    shutil.copy(WORKFLOW, workflow)
    plant(workflow, old, new)
    failures = _lint_workflow(workflow)
    assert linter in [f.split(":")[0] for f in failures], failures
