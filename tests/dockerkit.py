"""The Docker build context, by the rules of ``.dockerignore`` (compose and image tests)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ignored(path: str, patterns: list[str]) -> bool:
    """``.dockerignore``'s rule: the last pattern matching the path or a parent decides."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if any(
            fnmatch.fnmatchcase(p, glob) or fnmatch.fnmatchcase(p, glob.removeprefix("**/"))
            for p in prefixes
        ) or (glob.startswith("**/") and glob[3:] in parts):
            verdict = not negated
    return verdict


def docker_context(root: Path = ROOT) -> list[str]:
    """The files ``docker build .`` sends, by the rules of ``.dockerignore``."""
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sent = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        here = "" if rel == "." else rel + "/"
        # a folder that is ignored and that no `!` pattern reaches into is not walked (.venv)
        dirs[:] = [
            d
            for d in dirs
            if not _ignored(here + d, patterns)
            or any(p.startswith("!" + here + d) for p in patterns)
        ]
        sent += [here + f for f in files if not _ignored(here + f, patterns)]
    return sent
