"""Helpers for flash-sale tests: catalog rows, sales, a running consumer, waiting."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio import Redis

from consumers import reconcile
from flashsale.auth import TokenService
from flashsale.stores import rediskeys
from gateway.fastjoin import GatewayRunner


async def make_sku(db: asyncpg.Pool, on_hand: int = 10_000, price: int = 10_000) -> int:
    merchant = await db.fetchval(
        "INSERT INTO users (email, password_hash, nickname, role) "
        "VALUES ($1, 'x', 'm', 'merchant') "
        "RETURNING id",
        f"m-{secrets.token_hex(6)}@test.local",
    )
    product = await db.fetchval(
        "INSERT INTO products (merchant_id, name) VALUES ($1, $2) RETURNING id",
        merchant,
        f"product {secrets.token_hex(3)}",
    )
    sku: int = await db.fetchval(
        "INSERT INTO skus (product_id, price_cents, on_hand) VALUES ($1, $2, $3) RETURNING id",
        product,
        price,
        on_hand,
    )
    return sku


async def make_users(db: asyncpg.Pool, n: int) -> list[int]:
    """Shoppers, each with a default address (a flash order is paid only with one)."""
    tag = secrets.token_hex(5)
    rows = await db.fetch(
        "INSERT INTO users (email, password_hash, nickname) "
        "SELECT 'u' || g || '-' || $2::text || '@t.local', 'x', 'u' FROM generate_series(1, $1) g "
        "RETURNING id",
        n,
        tag,
    )
    ids = [r["id"] for r in rows]
    await db.execute(
        "INSERT INTO addresses (user_id, name, phone, region, city, detail, is_default) "
        "SELECT u, 'Test', '13800138000', 'R', 'C', '1 Test Road', true "
        "FROM unnest($1::bigint[]) AS u",
        ids,
    )
    return ids


async def make_admin(db: asyncpg.Pool) -> int:
    """A new admin account of its own: a fixed id may be one whose tokens another test
    revoked (a password or role change)."""
    uid: int = await db.fetchval(
        "INSERT INTO users (email, password_hash, nickname, role) VALUES ($1, 'x', 'a', 'admin') "
        "RETURNING id",
        f"a-{secrets.token_hex(6)}@test.local",
    )
    return uid


async def admin_headers(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.issue(await make_admin(db), 'admin')}"}


def iso(dt: datetime) -> str:
    return dt.isoformat()


async def create_sale(
    client: TestClient[Any, Any],
    admin: dict[str, str],
    sku_id: int,
    *,
    quantity: int = 100,
    limit: int = 1,
    start_in_s: float = -1,
    duration_s: float = 3600,
    window_s: int = 900,
    price: int = 500,
    buckets: int = 1,
    **extra: Any,
) -> int:
    """A sale created over HTTP; ``extra`` adds fields to the request (``mode``, ``queue``)."""
    start = datetime.now(UTC) + timedelta(seconds=start_in_s)
    resp = await client.post(
        "/api/v1/admin/flash-sales",
        headers=admin,
        json={
            "sku_id": sku_id,
            "flash_price": price,
            "quantity": quantity,
            "per_user_limit": limit,
            "start_at": iso(start),
            "end_at": iso(start + timedelta(seconds=duration_s)),
            "payment_window_s": window_s,
            **({"buckets": buckets} if buckets != 1 else {}),
            **extra,
        },
    )
    assert resp.status == 201, await resp.text()
    sale_id: int = (await resp.json())["data"]["flash_sale_id"]
    return sale_id


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, every_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every_s)
    raise AssertionError("condition not met in time")


async def count_orders(db: asyncpg.Pool, sale_id: int) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM orders WHERE flash_sale_id = $1", sale_id)
    return n


async def remaining_of(redis: Redis, sale_id: int, bucket: int = 0) -> int:
    raw = await redis.hget(rediskeys.sale(sale_id, bucket), "remaining")
    assert raw is not None
    return int(raw)


async def join(
    client: TestClient[Any, Any], sale_id: int, headers: dict[str, str], quantity: int = 1
) -> Any:
    """POST a join for ``quantity`` units; returns the response."""
    return await client.post(
        f"/api/v1/flash-sales/{sale_id}/join", headers=headers, json={"quantity": quantity}
    )


async def join_final(
    client: TestClient[Any, Any], sale_id: int, headers: dict[str, str], quantity: int = 1
) -> tuple[int, str | None, str | None]:
    """Join once, retrying what the README calls retriable (503, 429) as a client does;
    returns (status, error, order id) of the final answer."""
    for _ in range(200):
        resp = await join(client, sale_id, headers, quantity)
        body = await resp.json()
        if resp.status not in (503, 429):
            return resp.status, body.get("error"), (body.get("data") or {}).get("order_id")
        await asyncio.sleep(0.02 + random.random() * 0.05)
    raise AssertionError(f"still {resp.status} after 200 tries: {body}")


SQL_FORGET_SALE = (
    "DELETE FROM order_logs WHERE order_id IN (SELECT id FROM orders WHERE flash_sale_id = $1)",
    "DELETE FROM order_items WHERE order_id IN (SELECT id FROM orders WHERE flash_sale_id = $1)",
    "DELETE FROM inventory_ledger WHERE flash_sale_id = $1",
    "DELETE FROM orders WHERE flash_sale_id = $1",
    "DELETE FROM flash_sales WHERE id = $1",
)


async def forget_sale(db: asyncpg.Pool, redis: Redis | None, sale_id: int) -> None:
    """Remove a sale and its orders from PostgreSQL (and its keys from ``redis``): for
    tests that leave a sale another test's reconcile must not see."""
    async with db.acquire() as conn, conn.transaction():
        for sql in SQL_FORGET_SALE:
            await conn.execute(sql, sale_id)
    if redis is not None:
        await redis.srem(rediskeys.SALES_INDEX, sale_id)
        await redis.delete(*rediskeys.all_sale_keys(sale_id))


async def create_sale_over_http(
    http: aiohttp.ClientSession,
    base: str,
    admin: dict[str, str],
    sku: int,
    quantity: int,
    *,
    buckets: int = 1,
) -> int:
    """A sale started a second ago for an hour (one unit a shopper), through a gateway
    running in another process at ``base``."""
    start = datetime.now(UTC) - timedelta(seconds=1)
    async with http.post(
        base + "/api/v1/admin/flash-sales",
        headers=admin,
        json={
            "sku_id": sku,
            "flash_price": 500,
            "quantity": quantity,
            "per_user_limit": 1,
            "start_at": start.isoformat(),
            "end_at": (start + timedelta(hours=1)).isoformat(),
            "payment_window_s": 900,
            "buckets": buckets,
        },
    ) as resp:
        body = await resp.json()
        assert resp.status == 201, body
        sale_id: int = body["data"]["flash_sale_id"]
        return sale_id


def sse_events(buf: bytes) -> tuple[list[tuple[str, Any]], bytes]:
    """The complete server-sent events in ``buf`` (name, JSON data) and what is left."""
    out: list[tuple[str, Any]] = []
    while b"\n\n" in buf:
        block, buf = buf.split(b"\n\n", 1)
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"event" in lines:
            out.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return out, buf


class GatewayServer(TestServer):
    """aiohttp's test server with the gateway's runner, so tests reach the join route
    the way production serves it (on the connection, :mod:`gateway.fastjoin`)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


async def equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def drift_free(db: asyncpg.Pool, redis: Redis, sale_id: int) -> bool:
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    report = await reconcile.check_sale(db, redis, sale)
    return (
        report.drift == 0 and not report.user_drift and report.in_log == 0 and report.claimed == 0
    )


async def queued_sale(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    admin: dict[str, str],
    *,
    quantity: int,
    start_in_s: float = -1,
    **queue: Any,
) -> int:
    """A queued sale of ``quantity`` units; ``queue`` sets its waiting room."""
    sku = await make_sku(db, on_hand=quantity + 100)
    return await create_sale(
        client,
        admin,
        sku,
        quantity=quantity,
        start_in_s=start_in_s,
        price=100,
        mode="queued",
        queue={"admit_per_s": 1000, "overbook": 1.0, **queue},
    )


async def enter(
    client: TestClient[Any, Any], sale_id: int, headers: dict[str, str], **body: Any
) -> Any:
    return await client.post(
        f"/api/v1/flash-sales/{sale_id}/enter", headers=headers, json=body or None
    )


async def poll(
    client: TestClient[Any, Any],
    sale_id: int,
    ticket: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    resp = await client.get(
        f"/api/v1/flash-sales/{sale_id}/queue", params={"ticket": ticket}, headers=headers
    )
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


async def admitted(
    client: TestClient[Any, Any],
    sale_id: int,
    ticket: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def check() -> bool:
        seen.clear()
        seen.update(await poll(client, sale_id, ticket, headers))
        return bool(seen["state"] == "admitted")

    await eventually(check, timeout_s=15)
    return seen
