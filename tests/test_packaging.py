"""What a fresh clone meets before any server runs: the install, ``.gitignore``, the help."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flashsale.timing import RECENT_SALES_DAYS
from stack import cli

REPO = Path(__file__).resolve().parent.parent

# How setuptools' PEP 660 backend would install this project in editable mode. The
# meta-path-finder strategy (_TopLevelFinder) is the one that emits the "Editable
# installation" BuildBackendWarning pip shows; a static .pth file (_StaticPth) emits none.
_STRATEGY = """
import warnings
warnings.simplefilter("ignore")
from setuptools.command.editable_wheel import editable_wheel
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

dist = apply_configuration(Distribution(), "pyproject.toml")
command = editable_wheel(dist)
command.ensure_finalized()
print(type(command._select_strategy("flashsale_gateway", "py3-none-any", "build")).__name__)
"""


@pytest.mark.unit
def test_editable_install_is_a_plain_pth_file_without_a_build_warning() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _STRATEGY],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "_StaticPth"


@pytest.mark.unit
@pytest.mark.parametrize(
    "path",
    [
        "tokens.txt",  # python -m loadtests.mint --out tokens.txt, as the locustfiles say
        "out/outcomes.1234",  # LOCUST_OUTCOMES=out/outcomes
        "out/stampede.html",
        "out/stampede_stats.csv",
        "loadtests/out/outcomes.1234",
        "bench-results.json",
    ],
)
def test_gitignore_covers_what_the_load_tests_write(path: str) -> None:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        [git, "check-ignore", "--no-index", "-q", path], cwd=REPO, timeout=30, check=False
    )
    assert proc.returncode == 0, f"{path} is not ignored"


@pytest.mark.unit
def test_reconcile_help_and_readme_say_recent_sales_of_the_same_days() -> None:
    help_text = " ".join(cli._parser().format_help().split())
    readme = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    [row] = [line for line in readme.splitlines() if line.startswith("| `flashsale reconcile")]
    window = f"ended in the last {RECENT_SALES_DAYS} days"
    assert "for recent sales" in help_text and window in help_text, help_text
    assert "active" not in help_text.split("reconcile", 1)[1].split("rebuild-cache", 1)[0]
    assert "recent sale" in row and window in row, row


def _make(*args: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        [make, "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.mark.unit
def test_make_help_describes_every_target() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    phony = makefile.split(".PHONY:", 1)[1].splitlines()[0].split()
    listed = dict(
        line.strip().removeprefix("make ").split(None, 1)
        for line in _make("help").splitlines()
        if line.strip()
    )
    assert set(phony) == set(listed), set(phony) ^ set(listed)
    assert _make() == _make("help")  # plain `make` shows the list


@pytest.mark.unit
def test_make_test_installs_what_the_tests_need_from_debian() -> None:
    """As `make browser` does for chromium: the wrk test does not skip on a machine like CI's."""
    planned = _make("-n", "test")  # -n: printed, not run
    assert re.search(r"apt-get install -y -qq wrk\b", planned), planned
    assert re.search(r"apt-get install -y -qq chromium chromium-driver", planned), planned


@pytest.mark.unit
def test_pre_commit_runs_what_ci_runs() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    entries = [hook["entry"] for repo in config["repos"] for hook in repo["hooks"]]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert entries == ["make lint", "make typecheck"]
    assert all(entry in ci for entry in entries), ci


@pytest.mark.unit
def test_the_project_documents_carry_what_they_should() -> None:
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Copyright (c)" in licence
    contributing = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for target in ("make run", "make test", "make bench", "tests/test_layers.py"):
        assert target in contributing, target
    assert "## Unreleased" in (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "Reporting a vulnerability" in (REPO / "SECURITY.md").read_text(encoding="utf-8")
