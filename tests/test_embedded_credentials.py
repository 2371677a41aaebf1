"""The embedded servers refuse connections without the generated credentials."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from stack.embedded import EmbeddedStack

pytestmark = pytest.mark.integration


@pytest.fixture
def embedded(stack: EmbeddedStack | None) -> EmbeddedStack:
    if stack is None:
        pytest.skip("the suite runs against external servers")
    return stack


def test_valkey_requires_a_password(embedded: EmbeddedStack) -> None:
    url = urlsplit(embedded.url("redis") or "")
    assert url.password
    with socket.create_connection(("127.0.0.1", url.port or 0), 5) as conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(128).startswith(b"-NOAUTH")


async def test_postgres_requires_the_password(embedded: EmbeddedStack) -> None:
    url = urlsplit(embedded.url("postgres") or "")
    assert url.password
    wrong = urlunsplit(url._replace(netloc=f"postgres:wrong@127.0.0.1:{url.port}"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)
    bare = urlunsplit(url._replace(netloc=f"postgres@127.0.0.1:{url.port}"))
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InterfaceError)):
        await asyncpg.connect(bare)
    conn = await asyncpg.connect(embedded.url("postgres"))
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


def test_credentials_are_kept_private(embedded: EmbeddedStack) -> None:
    files = [p for p in Path(embedded.root).rglob("*password") if p.is_file()]
    assert {p.parent.name for p in files} >= {"redis", "postgres"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
