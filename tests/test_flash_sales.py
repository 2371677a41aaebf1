"""The flash-sale pipeline on the real servers: no oversell, no lost order, clear errors."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.recovery import server_run_id
from flashsale.auth import TokenService
from flashsale.flash.cache import SaleCache, SaleState
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.redisclient import open_redis
from gateway import appkeys
from gateway.flash_runtime import FLASH
from tests.conftest import auth
from tests.flashkit import (
    admin_headers,
    count_orders,
    create_sale,
    drift_free,
    equals,
    eventually,
    join,
    make_sku,
    make_users,
    remaining_of,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def admin(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return await admin_headers(db, tokens)


async def test_create_sale_carves_stock(
    client: TestClient[Any, Any], db: asyncpg.Pool, admin: dict[str, str]
) -> None:
    sku = await make_sku(db, on_hand=500)
    sale_id = await create_sale(client, admin, sku, quantity=120)
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 380
    resp = await client.get(f"/api/v1/flash-sales/{sale_id}")
    data = (await resp.json())["data"]
    assert data["total_quantity"] == 120 and data["remaining_quantity"] == 120
    assert data["status"] == "active"
    active = (await (await client.get("/api/v1/flash-sales/active")).json())["data"]
    assert sale_id in [s["flash_sale_id"] for s in active]


async def test_create_sale_rules(
    client: TestClient[Any, Any], db: asyncpg.Pool, admin: dict[str, str], tokens: TokenService
) -> None:
    sku = await make_sku(db, on_hand=10)
    base = {
        "sku_id": sku,
        "flash_price": 100,
        "quantity": 5,
        "per_user_limit": 1,
        "start_at": "2030-01-01T10:00:00Z",
        "end_at": "2030-01-01T09:00:00Z",
        "payment_window_s": 900,
    }
    resp = await client.post("/api/v1/admin/flash-sales", headers=admin, json=base)
    assert resp.status == 422 and "end_at" in (await resp.json())["fields"]
    bad = {**base, "end_at": "2030-01-01T11:00:00Z", "quantity": 0, "flash_price": 1.5}
    resp = await client.post("/api/v1/admin/flash-sales", headers=admin, json=bad)
    assert set((await resp.json())["fields"]) == {"quantity", "flash_price"}
    too_many = {**base, "end_at": "2030-01-01T11:00:00Z", "quantity": 11}
    resp = await client.post("/api/v1/admin/flash-sales", headers=admin, json=too_many)
    assert resp.status == 409 and (await resp.json())["error"] == "INSUFFICIENT_STOCK"
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 10
    user = (await make_users(db, 1))[0]
    resp = await client.post(
        "/api/v1/admin/flash-sales",
        headers=auth(tokens, user),
        json={**base, "end_at": "2030-01-01T11:00:00Z"},
    )
    assert resp.status == 403


@pytest.mark.both_topologies
async def test_stampede_exactly_stock_accepted(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
    base_settings: Settings,
) -> None:
    sku = await make_sku(db)
    sale_id = await create_sale(client, admin, sku, quantity=100, limit=1)
    users = await make_users(db, 1000)
    headers = [auth(tokens, u) for u in users]

    async def attempt(i: int) -> tuple[int, str | None, str | None]:
        resp = await join(client, sale_id, headers[i % 1000])
        body = await resp.json()
        return resp.status, body.get("error"), (body.get("data") or {}).get("order_id")

    results = await asyncio.gather(*(attempt(i) for i in range(2000)))
    statuses = collections.Counter((s, e) for s, e, _ in results)
    accepted = [oid for s, _, oid in results if s == 202]
    assert len(accepted) == 100, statuses
    assert len(set(accepted)) == 100
    assert all(s in (202, 409, 429) for s, _, _ in results), statuses
    await eventually(lambda: equals(count_orders(db, sale_id), 100))
    per_user = await db.fetch(
        "SELECT user_id, count(*) AS n FROM orders WHERE flash_sale_id = $1 GROUP BY user_id "
        "HAVING count(*) > 1",
        sale_id,
    )
    assert per_user == []
    in_pg = {
        r["id"] for r in await db.fetch("SELECT id FROM orders WHERE flash_sale_id = $1", sale_id)
    }
    assert in_pg == set(accepted)
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None and sale["sold_quantity"] == 100
    await eventually(lambda: drift_free(db, redis, sale_id))


@pytest.mark.both_topologies
async def test_idempotent_retry_and_mismatch(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=5)
    user = auth(tokens, (await make_users(db, 1))[0])
    h = {**user, "Idempotency-Key": "k-1"}
    first = await join(client, sale_id, h, 2)
    again = await join(client, sale_id, h, 2)
    assert first.status == again.status == 202
    a, b = (await first.json())["data"], (await again.json())["data"]
    assert a["order_id"] == b["order_id"] and b["replayed"] is True
    assert await remaining_of(redis, sale_id) == 8
    other = await join(client, sale_id, h, 3)
    assert other.status == 422 and (await other.json())["error"] == "IDEMPOTENCY_MISMATCH"
    assert await remaining_of(redis, sale_id) == 8


@pytest.mark.both_topologies
@pytest.mark.parametrize("buckets", [1, 3])
async def test_a_keyed_retry_on_a_sold_out_sale_gets_its_order_back(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
    buckets: int,
) -> None:
    """A shopper who got OUTCOME_UNKNOWN (or lost the connection) retries with the same
    Idempotency-Key after the sale sold out: the worker's sold-out flag must not answer
    SOLD_OUT ("no") while its order stands. Each keyed attempt is one reservation-script
    call in the batcher, so a "yes" comes only after the batch's WAIT (with replicas
    awaited) covers the order it names; an unkeyed one is refused in-process."""
    sale_id = await create_sale(
        client, admin, await make_sku(db), quantity=2, limit=1, buckets=buckets
    )
    first, second, late = await make_users(db, 3)
    h = {**auth(tokens, first), "Idempotency-Key": "after-503"}
    won = await join(client, sale_id, h)
    assert won.status == 202
    order_id = (await won.json())["data"]["order_id"]
    assert (await join(client, sale_id, auth(tokens, second))).status == 202
    resp = await join(client, sale_id, auth(tokens, late))
    assert resp.status == 409 and (await resp.json())["error"] == "SOLD_OUT"
    await app[FLASH].cache.refresh()
    assert app[FLASH].cache.sales[sale_id].sold_out
    batcher = app[FLASH].batcher
    before = batcher.calls
    again = await join(client, sale_id, h)
    assert again.status == 202, await again.text()
    data = (await again.json())["data"]
    assert data["order_id"] == order_id and data["replayed"] is True
    other = await join(client, sale_id, h, 2)  # same key, another body
    assert other.status == 422 and (await other.json())["error"] == "IDEMPOTENCY_MISMATCH"
    fresh = await join(client, sale_id, {**auth(tokens, late), "Idempotency-Key": "new"})
    assert fresh.status == 409 and (await fresh.json())["error"] == "SOLD_OUT"
    assert batcher.calls == before + 3  # one script call per keyed attempt, no more
    unkeyed = await join(client, sale_id, auth(tokens, late))
    assert unkeyed.status == 409 and batcher.calls == before + 3  # the flag, no Redis


@pytest.mark.both_topologies
async def test_limit_returns_first_order(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=1)
    user = auth(tokens, (await make_users(db, 1))[0])
    first = await join(client, sale_id, user)
    again = await join(client, sale_id, user)
    assert again.status == 409
    body = await again.json()
    assert body["error"] == "LIMIT_EXCEEDED"
    assert body["data"]["order_id"] == (await first.json())["data"]["order_id"]


async def test_window_and_unknown_sale(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    user = auth(tokens, (await make_users(db, 1))[0])
    upcoming = await create_sale(client, admin, await make_sku(db), start_in_s=3600)
    resp = await client.post(
        f"/api/v1/flash-sales/{upcoming}/join", headers=user, json={"quantity": 1}
    )
    assert resp.status == 409 and (await resp.json())["error"] == "NOT_STARTED"
    ended = await create_sale(client, admin, await make_sku(db), start_in_s=-10, duration_s=5)
    resp = await client.post(
        f"/api/v1/flash-sales/{ended}/join", headers=user, json={"quantity": 1}
    )
    assert resp.status == 409 and (await resp.json())["error"] == "SALE_ENDED"
    resp = await client.post("/api/v1/flash-sales/999999/join", headers=user, json={"quantity": 1})
    assert resp.status == 404
    resp = await client.post(f"/api/v1/flash-sales/{upcoming}/join", json={"quantity": 1})
    assert resp.status == 401


async def test_join_validation(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=5)
    user = auth(tokens, (await make_users(db, 1))[0])
    for body in (
        {"quantity": 0},
        {"quantity": "1"},
        {},
        {"quantity": 1, "x": 1},
        {"quantity": 101},
    ):
        resp = await client.post(f"/api/v1/flash-sales/{sale_id}/join", headers=user, json=body)
        assert resp.status == 422, body
    resp = await client.post(f"/api/v1/flash-sales/{sale_id}/join", headers=user, data=b"{")
    assert resp.status == 400


@pytest.mark.both_topologies
async def test_sold_out_flag_makes_no_redis_call(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = app[FLASH]
    # the worker's machine-id lease is renewed through the same batcher on its own timer:
    # count the reservation script's calls, not every call the batcher carries
    reserves: list[int] = []
    carry = rt.batcher.call

    async def counted(script: Any, keys: Any, args: Any, **kw: Any) -> Any:
        if script is rt.scripts.reserve:
            reserves.append(1)
        return await carry(script, keys, args, **kw)

    monkeypatch.setattr(rt.batcher, "call", counted)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=2, limit=1)
    users = await make_users(db, 4)
    for u in users[:2]:
        resp = await join(client, sale_id, auth(tokens, u))
        assert resp.status == 202
    assert len(reserves) == 2  # each accepted join took one script call
    reserves.clear()
    for u in users[2:]:
        resp = await join(client, sale_id, auth(tokens, u))
        assert resp.status == 409 and (await resp.json())["error"] == "SOLD_OUT"
    assert reserves == []


@pytest.mark.both_topologies
async def test_top_up_and_close(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
) -> None:
    sku = await make_sku(db, on_hand=100)
    sale_id = await create_sale(client, admin, sku, quantity=2, limit=1)
    users = await make_users(db, 5)
    for u in users[:2]:
        await join(client, sale_id, auth(tokens, u))
    resp = await join(client, sale_id, auth(tokens, users[2]))
    assert (await resp.json())["error"] == "SOLD_OUT"
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}", headers=admin, json={"add_quantity": 3}
    )
    assert resp.status == 200 and (await resp.json())["data"]["remaining_quantity"] == 3
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 95
    resp = await join(client, sale_id, auth(tokens, users[2]))
    assert resp.status == 202  # the sold-out flag was cleared by the top-up
    for _ in range(2):  # closing twice returns the unsold units once
        resp = await client.post(f"/api/v1/admin/flash-sales/{sale_id}/close", headers=admin)
        assert resp.status == 200
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 97
    resp = await join(client, sale_id, auth(tokens, users[3]))
    assert (await resp.json())["error"] == "SALE_ENDED"
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}", headers=admin, json={"add_quantity": 1}
    )
    assert resp.status == 409
    await eventually(lambda: equals(count_orders(db, sale_id), 3))
    await eventually(lambda: drift_free(db, redis, sale_id))


async def test_flash_order_through_the_order_routes(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
) -> None:
    """Queued while in flight, pending_payment once persisted; cancel returns the units to the
    sale; paying through the sandbox provider marks it paid."""
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=1)
    user, other = await make_users(db, 2)
    rt = app[FLASH]
    order_id = app[appkeys.ORDER_IDS].next(user)
    keys = rediskeys.reserve_keys(sale_id, user, "127.0.0.1")
    # reserved but not yet published: what a shopper sees right after the 202
    await rt.scripts.reserve(
        keys=keys,
        args=[user, 1, order_id, "", "fp", 5, 10, 100, 100, await server_run_id(redis, sale_id)],
    )
    resp = await client.get(f"/api/v1/orders/{order_id}", headers=auth(tokens, user))
    assert resp.status == 200
    assert (await resp.json())["data"]["status"] == "queued"
    resp = await client.get(f"/api/v1/orders/{order_id}", headers=auth(tokens, other))
    assert resp.status == 404

    async def persisted() -> bool:
        r = await client.get(f"/api/v1/orders/{order_id}", headers=auth(tokens, user))
        return bool(r.status == 200 and (await r.json())["data"]["status"] == "pending_payment")

    await eventually(persisted, timeout_s=30)  # the sweeper published the stranded reservation
    assert await remaining_of(redis, sale_id) == 4
    resp = await client.post(f"/api/v1/orders/{order_id}/cancel", headers=auth(tokens, user))
    assert resp.status == 200, await resp.text()

    async def returned() -> bool:
        return await remaining_of(redis, sale_id) == 5

    await eventually(returned, timeout_s=10)
    await rt.cache.refresh()
    resp = await join(client, sale_id, auth(tokens, user))
    assert resp.status == 202  # the user's count came back with the units
    second = (await resp.json())["data"]["order_id"]

    async def pending() -> bool:
        r = await client.get(f"/api/v1/orders/{second}", headers=auth(tokens, user))
        return bool(r.status == 200 and (await r.json())["data"]["status"] == "pending_payment")

    await eventually(pending, timeout_s=30)
    resp = await client.post(
        f"/api/v1/orders/{second}/pay",
        headers=auth(tokens, user),
        json={"payment_method": "alipay"},
    )
    assert resp.status == 200, await resp.text()
    payment_id = (await resp.json())["data"]["payment_id"]
    resp = await client.post(
        f"/api/v1/payment/sandbox/{payment_id}/approve", headers=auth(tokens, user)
    )
    assert resp.status == 200, await resp.text()
    resp = await client.get(f"/api/v1/orders/{second}", headers=auth(tokens, user))
    assert (await resp.json())["data"]["status"] == "paid"
    await eventually(lambda: drift_free(db, redis, sale_id))


async def test_a_stampede_on_a_sale_the_worker_does_not_know_reads_it_once(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    admin: dict[str, str],
    base_settings: Settings,
) -> None:
    """A worker meets a sale it has not loaded yet (just started, or the sale was just
    created) with a stampede: the joins share one read of the sale, so a small client pool
    is not emptied and nobody is told the store is unavailable."""
    sku = await make_sku(db, on_hand=10)
    sale_id = await create_sale(client, admin, sku, quantity=5, start_in_s=3600)
    redis = open_redis(base_settings, max_connections=2)
    try:
        cache = SaleCache(redis)
        got = await asyncio.gather(
            *(cache.get(sale_id) for _ in range(300)), return_exceptions=True
        )
        assert [type(g).__name__ for g in got if not isinstance(g, SaleState)] == []
        assert {id(g) for g in got} == {id(cache.sales[sale_id])}
        assert await cache.get(sale_id + 10_000) is None  # an unknown sale is still unknown
    finally:
        await redis.aclose()
