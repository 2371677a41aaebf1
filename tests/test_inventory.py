"""Inventory API and reservations on real PostgreSQL (seed 000 §6.3)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import inventory
from flashsale.auth import TokenService
from flashsale.errors import Conflict
from tests.conftest import auth, make_user
from tests.store_helpers import make_product, pay_via_sandbox, place_order, sku_row

pytestmark = pytest.mark.integration


async def test_stock_view(client: TestClient[Any, Any], db: asyncpg.Pool) -> None:
    merchant = await make_user(db, "merchant")
    pid, (_a, _b, _c) = await make_product(db, merchant, [(100, 50), (100, 3), (100, 0)])
    resp = await client.get(f"/api/v1/products/{pid}/stock")
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data["available_stock"] == 53 and data["total_stock"] == 53
    assert data["reserved_stock"] == 0 and data["status"] == "sufficient"
    assert [s["status"] for s in data["skus"]] == ["sufficient", "low", "out_of_stock"]
    assert (await client.get("/api/v1/products/999999999/stock")).status == 404


async def test_reserve_consume_release_api(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant = await make_user(db, "merchant")
    pid, (sku,) = await make_product(db, merchant, [(100, 10)])
    h = auth(tokens, merchant, "merchant")
    url = f"/api/v1/products/{pid}"
    resp = await client.post(url + "/reserve", json={"quantity": 4, "expires_in": 60}, headers=h)
    assert resp.status == 201, await resp.text()
    held = (await resp.json())["data"]
    assert held["reserved_quantity"] == 4 and held["reservation_id"].startswith("RSV")
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 4, "sold": 0}
    stock = (await (await client.get(url + "/stock")).json())["data"]
    assert stock["available_stock"] == 6 and stock["reserved_stock"] == 4

    resp = await client.post(url + "/reserve", json={"sku_id": sku, "quantity": 7}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "INSUFFICIENT_STOCK"

    # A hold of no order is never sold: only a paid order consumes stock.
    resp = await client.post(
        url + "/consume",
        json={"reservation_id": held["reservation_id"], "actual_quantity": 3},
        headers=h,
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAID"
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 4, "sold": 0}

    resp = await client.post(
        url + "/release", json={"reservation_id": held["reservation_id"]}, headers=h
    )
    assert resp.status == 200
    resp = await client.post(
        url + "/release", json={"reservation_id": held["reservation_id"]}, headers=h
    )
    assert resp.status == 409 and (await resp.json())["error"] == "RESERVATION_NOT_ACTIVE"
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
    ledger = await db.fetch(
        "SELECT delta, reason FROM inventory_ledger WHERE sku_id = $1 ORDER BY id", sku
    )
    assert [r["delta"] for r in ledger] == [-4, 4]


async def test_merchant_cannot_fake_sales_or_hold_other_orders(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, rival, shopper = (
        await make_user(db, "merchant"),
        await make_user(db, "merchant"),
        await make_user(db),
    )
    pid, (sku,) = await make_product(db, merchant, [(100, 20_000)])
    _, (rival_sku,) = await make_product(db, rival, [(100, 10)])
    h = auth(tokens, merchant, "merchant")
    url = f"/api/v1/products/{pid}"

    # 10,000 units reserved and "consumed" by the merchant itself: no sale.
    resp = await client.post(url + "/reserve", json={"quantity": 10_000}, headers=h)
    assert resp.status == 201
    rid = (await resp.json())["data"]["reservation_id"]
    resp = await client.post(url + "/consume", json={"reservation_id": rid}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAID"
    assert await db.fetchval("SELECT sales FROM products WHERE id = $1", pid) == 0
    await client.post(url + "/release", json={"reservation_id": rid}, headers=h)

    # A hold on an order that does not hold this product (or no order at all): 404.
    _, other = await place_order(client, tokens, shopper, rival_sku)
    for order_id in (other["data"]["order_id"], "ORD-NO-SUCH"):
        resp = await client.post(
            url + "/reserve", json={"quantity": 1, "order_id": order_id}, headers=h
        )
        assert resp.status == 404, await resp.text()

    # On an order with the product, the hold cannot exceed what the order still needs:
    # checkout already holds the whole line, so a 10,000-unit hold that the payment
    # would consume (and count as sales) is refused.
    _, mine = await place_order(client, tokens, shopper, sku, 2)
    order_id = mine["data"]["order_id"]
    resp = await client.post(
        url + "/reserve", json={"quantity": 10_000, "order_id": order_id}, headers=h
    )
    assert resp.status == 409 and (await resp.json())["error"] == "HOLD_EXCEEDS_ORDER"
    # The order's own hold is not the merchant's to consume or release.
    own = await db.fetchval("SELECT id FROM stock_reservations WHERE order_id = $1", order_id)
    resp = await client.post(url + "/consume", json={"reservation_id": own}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAID"
    resp = await client.post(url + "/release", json={"reservation_id": own}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "HELD_BY_ORDER"

    await pay_via_sandbox(client, tokens, shopper, mine["data"]["payment_id"])
    assert await db.fetchval("SELECT sales FROM products WHERE id = $1", pid) == 2
    assert await sku_row(db, sku) == {"on_hand": 19_998, "reserved": 0, "sold": 2}
    resp = await client.post(url + "/consume", json={"reservation_id": own}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "RESERVATION_NOT_ACTIVE"
    resp = await client.post(
        url + "/reserve", json={"quantity": 1, "order_id": order_id}, headers=h
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PENDING"
    assert await db.fetchval("SELECT sales FROM products WHERE id = $1", pid) == 2


async def test_reserve_permissions_and_validation(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant = await make_user(db, "merchant")
    other = await make_user(db, "merchant")
    shopper = await make_user(db)
    pid, _ = await make_product(db, merchant, [(100, 10), (200, 10)])
    url = f"/api/v1/products/{pid}/reserve"
    resp = await client.post(url, json={"quantity": 1}, headers=auth(tokens, shopper))
    assert resp.status == 403
    resp = await client.post(url, json={"quantity": 1}, headers=auth(tokens, other, "merchant"))
    assert resp.status == 403
    h = auth(tokens, merchant, "merchant")
    resp = await client.post(url, json={"quantity": 1}, headers=h)  # two SKUs: sku_id needed
    assert resp.status == 422
    resp = await client.post(url, json={"quantity": 0, "sku_id": 1}, headers=h)
    assert resp.status == 422
    assert (await client.post(url, json={"quantity": 1})).status == 401


async def test_concurrent_reservations_never_oversell(
    client: TestClient[Any, Any], db: asyncpg.Pool
) -> None:
    merchant = await make_user(db, "merchant")
    _, (sku,) = await make_product(db, merchant, [(100, 7)])

    async def one() -> bool:
        async with db.acquire() as conn, conn.transaction():
            try:
                await inventory.reserve(conn, sku_id=sku, quantity=1, order_id=None, ttl_s=60)
            except Conflict:
                return False
            return True

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert sum(results) == 7
    assert await sku_row(db, sku) == {"on_hand": 7, "reserved": 7, "sold": 0}


async def test_expired_reservation_released_once_by_two_sweepers(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool
) -> None:
    merchant = await make_user(db, "merchant")
    _, (sku,) = await make_product(db, merchant, [(100, 5)])
    async with db.acquire() as conn, conn.transaction():
        held = await inventory.reserve(conn, sku_id=sku, quantity=3, order_id=None, ttl_s=60)
    await db.execute(
        "UPDATE stock_reservations SET reserved_until = now() - interval '1 s' WHERE id = $1",
        held.reservation_id,
    )
    # Two sweepers race (and a consumer's store sweeper may join them).
    results = await asyncio.gather(inventory.release_expired(db), inventory.release_expired(db))
    assert sum(results) <= 1
    for _ in range(50):
        if (await sku_row(db, sku))["reserved"] == 0:
            break
        await asyncio.sleep(0.05)
    assert await sku_row(db, sku) == {"on_hand": 5, "reserved": 0, "sold": 0}
    status = await db.fetchval(
        "SELECT status FROM stock_reservations WHERE id = $1", held.reservation_id
    )
    assert status == "released"
    releases = await db.fetchval(
        "SELECT count(*) FROM inventory_ledger WHERE reason = $1", f"release:{held.reservation_id}"
    )
    assert releases == 1
    async with db.acquire() as conn, conn.transaction():
        assert await inventory.release(conn, held.reservation_id, reason="again") is False
