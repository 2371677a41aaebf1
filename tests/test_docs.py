"""The documentation a clone carries: every link resolves inside the repository, every path a
page names exists, and the README's "Where things live" table matches the tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A markdown link or image: [text](target) / ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A repository path named in backticks, e.g. `consumers/recovery.py` or `lua/reserve.lua`.
NAMED_PATH = re.compile(
    r"`((?:flashsale|gateway|consumers|stack|lua|loadtests|deploy|tests|docs)/[\w./-]+\.\w+)`"
)
# Top-level documents that describe the project rather than a place in it.
PROJECT_DOCS = re.compile(r"^(?:[A-Z]+(?:\.md)?)$")


def _tracked_top_level() -> set[str]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        [git, "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return {line.split("/", 1)[0] + ("/" if "/" in line else "") for line in out.splitlines()}


def _where_table() -> list[list[str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    return [
        re.findall(r"`([^`]+)`", row.split("|")[1])
        for row in section.splitlines()
        if row.startswith("| `")
    ]


@pytest.mark.unit
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text, f"{page.name} points outside the clone"
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://", target):
            continue
        path = target.split("#", 1)[0]
        if path:
            resolved = (page.parent / path).resolve()
            assert resolved.exists(), f"{page.name}: {target} does not exist"
            assert resolved.is_relative_to(REPO), f"{page.name}: {target} leaves the clone"


@pytest.mark.unit
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = [p for p in NAMED_PATH.findall(text) if "*" not in p and not (REPO / p).exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.unit
def test_the_tests_the_architecture_page_names_exist() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", text))
    assert named, "the 'What survives what' table names no test"
    defined = {
        m
        for f in (REPO / "tests").glob("test_*.py")
        for m in re.findall(r"^(?:async )?def (test_\w+)", f.read_text(encoding="utf-8"), re.M)
    }
    assert named <= defined, f"named but not defined: {sorted(named - defined)}"


@pytest.mark.unit
def test_where_things_live_matches_the_tree() -> None:
    rows = _where_table()
    listed: set[str] = set()
    for names in rows:
        base = REPO
        for name in names:
            if name in ("…", "..."):
                continue
            path = REPO / name if (REPO / name).exists() else base / name
            assert path.exists(), f"'Where things live' names {name}, which does not exist"
            base = path if path.is_dir() else path.parent
            listed.add(name.split("/", 1)[0] + ("/" if "/" in name else ""))
    unlisted = {
        entry
        for entry in _tracked_top_level()
        if not entry.startswith(".") and not PROJECT_DOCS.match(entry)
    } - listed
    assert not unlisted, f"'Where things live' does not say what these are: {sorted(unlisted)}"


@pytest.mark.unit
def test_the_banner_prints_the_readmes_stampede_to_stdout_apart_from_the_logs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flashsale.settings import Settings
    from stack.up import _banner

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    walk = readme.split("a stampede from a second process", 1)[1].split("```sh\n", 1)[1]
    commands = walk.split("```", 1)[0].strip().splitlines()
    assert any("locust" in c for c in commands), commands
    _banner(Settings.from_env({}), f"http://127.0.0.1:{_closed_port()}", {}, 1.0, 2.0, None)
    out, err = capsys.readouterr()
    assert err == ""  # the logs' stream carries no banner line
    shown = [line.strip() for line in out.splitlines()]
    at = shown.index(commands[0])
    assert shown[at : at + len(commands)] == commands, out


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
