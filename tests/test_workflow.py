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


def test_the_workflow_tests_then_publishes_main_only() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    test, deploy = workflow["jobs"]["test"], workflow["jobs"]["deploy"]
    service = test["services"]["postgres"]
    assert service["image"] == "postgres:16"
    assert "--health-cmd" in service["options"]
    assert test["env"]["TEST_DATABASE_URL"].startswith("postgresql://")
    assert test["env"]["REQUIRE_BROWSER_TEST"]
    runs = [step.get("run") for step in test["steps"]]
    assert runs.index("make test") < runs.index("make site")
    site_step = next(step for step in test["steps"] if step.get("run") == "make site")
    assert "SITE_URL" in site_step["env"]
    uses = [step.get("uses", "").split("@")[0] for job in (test, deploy) for step in job["steps"]]
    assert "actions/upload-pages-artifact" in uses
    assert "actions/deploy-pages" in uses
    main_only = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
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
