"""Tokens die with the identity: role, password, disable/delete and logout revoke them
on every worker (two apps on one Redis stand for two workers)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode

from flashsale import sessions
from flashsale.auth import TokenService
from flashsale.errors import AppError, RevocationUnavailable
from flashsale.settings import Settings, SettingsError
from flashsale.stores import rediskeys
from gateway.app import create_app
from stack.embedded import free_port
from tests.conftest import TEST_SECRET, make_user
from tests.flashkit import GatewayServer, admin_headers, create_sale, eventually, join, make_sku

pytestmark = pytest.mark.integration

SQL_PRODUCTS_OF = "SELECT count(*) FROM products WHERE merchant_id = $1"


@pytest.fixture(scope="module")
async def other(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """A second worker: its own app, its own in-process revocation map, the same Redis.

    Its periodic reload is slower than the tests' deadline, so only pub/sub can tell it.
    """
    settings = base_settings.with_(revocation_reload_ms=60_000, revocation_max_stale_s=600)
    async with TestClient(GatewayServer(create_app(settings))) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _refused(
    client: TestClient[Any, Any],
    headers: dict[str, str],
    *,
    method: str = "GET",
    path: str = "/api/v1/users/me",
    json: Any = None,
) -> None:
    """Poll until the request is refused with TOKEN_REVOKED (the speed is not asserted)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = await client.request(method, path, headers=headers, json=json)
        if resp.status == 401:
            assert (await resp.json())["error"] == "TOKEN_REVOKED"
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the revoked token was still accepted")


async def _writes_until_refused(
    client: TestClient[Any, Any],
    headers: dict[str, str],
    *,
    path: str,
    json: Any,
    written: Callable[[], Awaitable[int]],
    after: int = 5,
) -> int:
    """POST a write with a token being revoked until it is refused with TOKEN_REVOKED,
    then ``after`` more times; returns how many the window accepted.

    Every accepted write is counted in the store (``written``: rows or units made so far),
    so nothing slips through unseen, and nothing is written once the refusal took effect.
    """
    base = await written()
    accepted = 0
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"still accepted after 30 s ({accepted} writes)"
        resp = await client.post(path, headers=headers, json=json)
        if resp.status == 401:
            assert (await resp.json())["error"] == "TOKEN_REVOKED"
            break
        if resp.status == 429:  # the token passed, the per-user rate did not: no write
            await asyncio.sleep(float(resp.headers["Retry-After"]))
            continue
        assert resp.status in (201, 202), await resp.text()
        accepted += 1
        await asyncio.sleep(0.02)
    at_refusal = await written()
    assert at_refusal - base == accepted, (at_refusal - base, accepted)
    for _ in range(after):
        resp = await client.post(path, headers=headers, json=json)
        assert resp.status == 401 and (await resp.json())["error"] == "TOKEN_REVOKED"
    assert await written() == at_refusal
    return accepted


async def _register_and_login(client: TestClient[Any, Any], password: str) -> tuple[str, str]:
    email = f"id-{secrets.token_hex(5)}@example.com"
    resp = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": password, "nickname": "N"}
    )
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/v1/auth/login", json={"login": email, "password": password})
    assert resp.status == 200, await resp.text()
    return email, (await resp.json())["data"]["token"]


async def test_logout_revokes_on_the_other_worker(
    client: TestClient[Any, Any], other: TestClient[Any, Any]
) -> None:
    email, token = await _register_and_login(client, "logout-pass-1")
    assert (await other.get("/api/v1/users/me", headers=_bearer(token))).status == 200
    resp = await client.post("/api/v1/auth/logout", headers=_bearer(token))
    assert resp.status == 200, await resp.text()
    await _refused(other, _bearer(token))
    await _refused(client, _bearer(token))
    # logging in again works on both workers
    resp = await other.post(
        "/api/v1/auth/login", json={"login": email, "password": "logout-pass-1"}
    )
    fresh = (await resp.json())["data"]["token"]
    assert (await client.get("/api/v1/users/me", headers=_bearer(fresh))).status == 200
    assert (await other.get("/api/v1/users/me", headers=_bearer(fresh))).status == 200


async def test_password_change_revokes_old_tokens(
    client: TestClient[Any, Any], other: TestClient[Any, Any]
) -> None:
    email, token = await _register_and_login(client, "old-password-1")
    resp = await client.put(
        "/api/v1/users/me/password",
        headers=_bearer(token),
        json={"old_password": "old-password-1", "new_password": "new-password-2"},
    )
    assert resp.status == 200, await resp.text()
    fresh = (await resp.json())["data"]["token"]
    await _refused(other, _bearer(token))
    assert (await other.get("/api/v1/users/me", headers=_bearer(fresh))).status == 200
    resp = await client.post(
        "/api/v1/auth/login", json={"login": email, "password": "old-password-1"}
    )
    assert resp.status == 401


async def test_role_change_revokes(
    client: TestClient[Any, Any],
    other: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
) -> None:
    admin = await admin_headers(db, tokens)
    merchant = await make_user(db, "merchant")
    token = tokens.issue(merchant, "merchant")
    product = {"name": "demoted", "price": 100, "stock": 1}

    async def products() -> int:
        n: int = await db.fetchval(SQL_PRODUCTS_OF, merchant)
        return n

    resp = await other.post("/api/v1/products", headers=_bearer(token), json=product)
    assert resp.status == 201 and await products() == 1  # the token writes before the change
    resp = await client.patch(
        f"/api/v1/admin/users/{merchant}", headers=admin, json={"role": "user"}
    )
    assert resp.status == 200, await resp.text()
    window = await _writes_until_refused(
        other, _bearer(token), path="/api/v1/products", json=product, written=products
    )
    assert await products() == 1 + window
    # the role itself changed: re-read where it is kept and where an admin sees it
    assert await db.fetchval("SELECT role FROM users WHERE id = $1", merchant) == "user"
    resp = await other.get(
        "/api/v1/admin/users", headers=admin, params={"q": str(merchant), "role": "user"}
    )
    found = (await resp.json())["data"]["users"]
    assert [(u["id"], u["role"]) for u in found] == [(merchant, "user")]
    # and a token of the role it has now cannot do what the old one did
    gen = await db.fetchval("SELECT token_gen FROM users WHERE id = $1", merchant)
    fresh = _bearer(tokens.issue(merchant, "user", gen=gen))
    resp = await other.post("/api/v1/products", headers=fresh, json=product)
    assert resp.status == 403
    assert await products() == 1 + window


async def test_role_change_needs_admin(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    resp = await client.patch(
        f"/api/v1/admin/users/{uid}",
        headers=_bearer(tokens.issue(uid, "user")),
        json={"role": "admin"},
    )
    assert resp.status == 403
    admin = await admin_headers(db, tokens)
    resp = await client.patch("/api/v1/admin/users/999999999", headers=admin, json={"role": "user"})
    assert resp.status == 404
    resp = await client.patch(f"/api/v1/admin/users/{uid}", headers=admin, json={"role": "root"})
    assert resp.status == 422


async def test_delete_and_disable_revoke(
    client: TestClient[Any, Any],
    other: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
) -> None:
    admin = await admin_headers(db, tokens)
    email, token = await _register_and_login(client, "doomed-pass-1")
    uid = (await (await client.get("/api/v1/users/me", headers=_bearer(token))).json())["data"][
        "id"
    ]
    resp = await other.delete(f"/api/v1/admin/users/{uid}", headers=admin)
    assert resp.status == 200, await resp.text()
    await _refused(client, _bearer(token))
    resp = await client.post(
        "/api/v1/auth/login", json={"login": email, "password": "doomed-pass-1"}
    )
    assert resp.status == 403 and (await resp.json())["error"] == "ACCOUNT_DISABLED"
    # re-enabling lets the owner in again; the old token stays dead
    resp = await client.patch(f"/api/v1/admin/users/{uid}", headers=admin, json={"disabled": False})
    assert resp.status == 200 and (await resp.json())["data"]["disabled"] is False
    resp = await client.post(
        "/api/v1/auth/login", json={"login": email, "password": "doomed-pass-1"}
    )
    assert resp.status == 200
    assert (await other.get("/api/v1/users/me", headers=_bearer(token))).status == 401


async def test_revoked_token_cannot_join(
    client: TestClient[Any, Any],
    other: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
) -> None:
    admin = await admin_headers(db, tokens)
    # room for every join the window may allow: no limit or stock refusal hides a write
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5000, limit=5000)
    uid = await make_user(db)
    token = tokens.issue(uid, "user")

    async def units() -> int:
        held = await redis.hget(rediskeys.users(sale_id), str(uid))
        return int(held or 0)

    resp = await join(other, sale_id, _bearer(token))
    assert resp.status == 202, await resp.text()
    assert await units() == 1
    resp = await client.post("/api/v1/auth/logout", headers=_bearer(token))
    assert resp.status == 200
    window = await _writes_until_refused(
        other,
        _bearer(token),
        path=f"/api/v1/flash-sales/{sale_id}/join",
        json={"quantity": 1},
        written=units,
    )
    assert await units() == 1 + window
    remaining = await redis.hget(rediskeys.sale(sale_id), "remaining")
    assert int(remaining or -1) == 5000 - 1 - window


def _cli_user(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack", "user", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_user_commands_revoke(
    base_settings: Settings,
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
) -> None:
    uid = await make_user(db, "merchant")
    token = tokens.issue(uid, "merchant")
    result = await asyncio.to_thread(
        _cli_user, base_settings, "set-role", "--id", str(uid), "--role", "user"
    )
    assert result.returncode == 0, result.stderr
    await _refused(client, _bearer(token))
    result = await asyncio.to_thread(_cli_user, base_settings, "disable", "--id", str(uid))
    assert result.returncode == 0, result.stderr
    assert await redis.hget(rediskeys.AUTH_GENERATIONS, str(uid)) == b"2"
    assert await db.fetchval("SELECT disabled_at IS NOT NULL FROM users WHERE id = $1", uid)


async def test_map_is_reseeded_from_postgres(
    db: asyncpg.Pool, redis: Redis, base_settings: Settings
) -> None:
    uid = await make_user(db)
    await db.execute("UPDATE users SET token_gen = 3 WHERE id = $1", uid)
    await redis.delete(
        rediskeys.AUTH_GENERATIONS_SEEDED, rediskeys.AUTH_GENERATIONS
    )  # as after a Redis restart
    fresh = sessions.Revocations(max_stale_s=60)
    await fresh.refresh(redis, db)
    assert fresh.current(uid) == 3
    assert await redis.hget(rediskeys.AUTH_GENERATIONS, str(uid)) == b"3"


async def test_the_revocation_poller_outlives_a_cluster_that_reaches_no_node(
    db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster client that reaches none of its nodes (a partition, every node restarting)
    raises RedisClusterException, no RedisError: the poller must live through it, or the
    worker's map would never be confirmed again and every authenticated request would get
    503 ``AUTH_UNAVAILABLE`` long after the cluster came back."""
    nowhere = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", free_port())], socket_connect_timeout=1
    )
    revocations = sessions.Revocations(max_stale_s=60)
    caplog.set_level("WARNING", logger="flashsale.stores.tasks")
    try:
        async with sessions.kept_fresh(revocations, cast(Redis, nowhere), db, every_s=0.05):

            async def failed_thrice() -> bool:  # the poller tried, waited, tried again
                failed = [
                    r for r in caplog.records if "revocation list refresh failed" in r.message
                ]
                return len(failed) >= 3

            await eventually(failed_thrice, timeout_s=30, every_s=0.05)
    finally:
        await nowhere.aclose()
    assert revocations.synced_at == 0.0  # never confirmed: tokens are refused, not trusted


def test_stale_map_fails_closed() -> None:
    revocations = sessions.Revocations(max_stale_s=5)
    service = TokenService(TEST_SECRET, 60, revocations=revocations)
    token = service.issue(11, "user")
    with pytest.raises(RevocationUnavailable):
        service.verify(token)  # never synced
    revocations.synced_at = time.time()
    assert service.verify(token).user_id == 11
    revocations.apply(11, 1)
    with pytest.raises(AppError):
        service.verify(token)


def test_stale_limit_must_cover_reloads() -> None:
    with pytest.raises(SettingsError, match="REVOCATION_MAX_STALE_S"):
        Settings.from_env(
            {"FLASHSALE_REVOCATION_RELOAD_MS": "5000", "FLASHSALE_REVOCATION_MAX_STALE_S": "5"}
        )
