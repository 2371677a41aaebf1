"""``flashsale clean`` (``make clean``): remove everything the stack kept for one data folder.

That is the data folder itself and, for a clone the PostgreSQL server user cannot reach (a
private folder in root's home), the PostgreSQL data kept for it under /var/lib/flashsale:
left behind, it outlives the password in the data folder and the next start cannot log in.
Nothing is removed while a ``flashsale up`` holds the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
from pathlib import Path

SHARED_PG_DATA = Path("/var/lib/flashsale")
_SHARED_HOME = re.compile(r"postgres-[0-9a-f]{12}")


class CleanRefused(Exception):
    """One line for the operator: the folder is in use."""


def shared_postgres_home(pg_dir: Path) -> Path:
    """Where PostgreSQL's data for ``pg_dir`` lives when its server user cannot reach it;
    named after the folder, so that the next start (and ``clean``) finds it again."""
    tag = hashlib.sha256(str(pg_dir.resolve()).encode()).hexdigest()[:12]
    return SHARED_PG_DATA / f"postgres-{tag}"


def kept_elsewhere(data_dir: Path) -> list[Path]:
    """The folders outside ``data_dir`` that the stack keeps for it."""
    pg_dir = data_dir / "postgres"
    found = {shared_postgres_home(pg_dir)}
    with contextlib.suppress(OSError, IndexError):
        found.add(Path((pg_dir / "data.location").read_text().splitlines()[0].strip()))
    # only ever a folder of the shape the stack makes, whatever data.location says
    return sorted(
        p
        for p in found
        if p.parent == SHARED_PG_DATA and _SHARED_HOME.fullmatch(p.name) and p.exists()
    )


def _holder(data_dir: Path) -> str | None:
    """The pid of the ``flashsale up`` holding ``data_dir`` (its lock), if one does."""
    lock = data_dir / "up.lock"
    if not lock.exists():
        return None
    with lock.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "?"
    return None


def clean(data_dir: Path) -> list[Path]:
    """Remove ``data_dir`` and what is kept for it elsewhere; return what was removed."""
    holder = _holder(data_dir)
    if holder is not None:
        raise CleanRefused(
            f"a `flashsale up` (pid {holder}) is using {data_dir.resolve()}; stop it first"
        )
    removed = []
    for path in [*kept_elsewhere(data_dir), data_dir]:
        if path.exists():
            shutil.rmtree(path)
            removed.append(path.resolve())
    return removed
