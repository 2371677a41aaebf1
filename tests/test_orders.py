"""Orders on real PostgreSQL: creation, idempotency, state machine, timeout close."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import orders
from flashsale.auth import TokenService
from gateway import appkeys
from tests.conftest import auth, make_user
from tests.flashkit import eventually
from tests.store_helpers import ADDRESS, make_product, pay_via_sandbox, place_order, sku_row

pytestmark = pytest.mark.integration


async def test_create_order_and_read_it(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _pid, (sku_a, sku_b) = await make_product(db, merchant, [(2999, 10), (199, 10)])
    pid_single, (sku_c,) = await make_product(db, merchant, [(500, 5)])
    body = {
        "items": [
            {"sku_id": sku_a, "quantity": 2, "price": 2999},
            {"sku_id": sku_b, "quantity": 1},
            {"product_id": pid_single, "quantity": 1, "price": 500},
        ],
        "shipping_address": ADDRESS,
    }
    resp = await client.post("/api/v1/orders", json=body, headers=auth(tokens, user))
    assert resp.status == 201, await resp.text()
    data = (await resp.json())["data"]
    assert data["total_amount"] == 2 * 2999 + 199 + 500
    assert data["discount_amount"] == 0
    assert data["final_amount"] == data["total_amount"] + data["shipping_fee"]
    assert data["status"] == "pending_payment" and data["version"] == 1
    assert data["payment_url"].endswith(data["payment_id"]) and data["expires_at"]
    assert await sku_row(db, sku_a) == {"on_hand": 10, "reserved": 2, "sold": 0}
    assert await sku_row(db, sku_c) == {"on_hand": 5, "reserved": 1, "sold": 0}

    resp = await client.get(f"/api/v1/orders/{data['order_id']}", headers=auth(tokens, user))
    assert resp.status == 200
    detail = (await resp.json())["data"]
    assert [
        (i["sku_id"], i["quantity"], i["price"], i["subtotal"]) for i in detail["items"]
    ] == sorted([(sku_a, 2, 2999, 5998), (sku_b, 1, 199, 199), (sku_c, 1, 500, 500)])
    assert all(i["product_name"] and i["snapshot_id"] for i in detail["items"])
    assert detail["shipping_info"]["name"] == ADDRESS["name"]
    assert detail["payment_info"]["status"] == "pending"

    resp = await client.get("/api/v1/orders?status=pending", headers=auth(tokens, user))
    listing = (await resp.json())["data"]
    assert listing["total"] == 1 and listing["orders"][0]["order_id"] == data["order_id"]
    resp = await client.get("/api/v1/orders?status=paid", headers=auth(tokens, user))
    assert (await resp.json())["data"]["total"] == 0
    resp = await client.get("/api/v1/orders?status=bogus", headers=auth(tokens, user))
    assert resp.status == 422
    resp = await client.get(f"/api/v1/orders/{data['order_id']}/logs", headers=auth(tokens, user))
    assert [(r["from_status"], r["to_status"]) for r in (await resp.json())["data"]] == [
        (None, "pending_payment")
    ]


async def test_identical_items_share_one_snapshot(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    for _ in range(2):
        status, _ = await place_order(client, tokens, user, sku)
        assert status == 201
    ids = await db.fetch("SELECT DISTINCT snapshot_id FROM order_items WHERE sku_id = $1", sku)
    assert len(ids) == 1
    await db.execute("UPDATE skus SET price_cents = 120 WHERE id = $1", sku)
    assert (await place_order(client, tokens, user, sku))[0] == 201
    ids = await db.fetch("SELECT DISTINCT snapshot_id FROM order_items WHERE sku_id = $1", sku)
    assert len(ids) == 2


async def test_create_order_validation_and_conflicts(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    pid, (sku, sku2) = await make_product(db, merchant, [(100, 3), (100, 3)])
    h = auth(tokens, user)
    bad_bodies: list[dict[str, Any]] = [
        {"items": [], "shipping_address": ADDRESS},
        {"items": [{"sku_id": sku, "quantity": 0}], "shipping_address": ADDRESS},
        {"items": [{"sku_id": sku, "quantity": 1}], "shipping_address": {"name": "x"}},
        {"items": [{"product_id": pid, "quantity": 1}], "shipping_address": ADDRESS},
        {"items": [{"sku_id": sku, "product_id": pid, "quantity": 1}], "shipping_address": ADDRESS},
        {"items": [{"sku_id": sku, "quantity": 1}]},
    ]
    for body in bad_bodies:
        resp = await client.post("/api/v1/orders", json=body, headers=h)
        assert resp.status == 422, body
    assert (await client.post("/api/v1/orders", json=bad_bodies[0])).status == 401

    status, data = await place_order(client, tokens, user, sku, 4)
    assert status == 409 and data["error"] == "INSUFFICIENT_STOCK"
    body = {"items": [{"sku_id": sku, "quantity": 1, "price": 99}], "shipping_address": ADDRESS}
    resp = await client.post("/api/v1/orders", json=body, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "PRICE_CHANGED"
    status, data = await place_order(client, tokens, user, 999_999_999)
    assert status == 404 and data["error"] == "SKU_NOT_FOUND"
    await db.execute("UPDATE skus SET status = 'off_sale' WHERE id = $1", sku2)
    status, data = await place_order(client, tokens, user, sku2)
    assert status == 409 and data["error"] == "NOT_ON_SALE"
    # The coupon step fails after stock was reserved: the reservation is undone.
    status, data = await place_order(client, tokens, user, sku, 2, coupon_code="NOPE")
    assert status == 422
    assert await sku_row(db, sku) == {"on_hand": 3, "reserved": 0, "sold": 0}
    assert await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user) == 0


async def test_concurrent_orders_on_one_sku(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant = await make_user(db, "merchant")
    stock, buyers = 5, 15
    _, (sku,) = await make_product(db, merchant, [(100, stock)])
    users = [await make_user(db) for _ in range(buyers)]
    results = await asyncio.gather(*(place_order(client, tokens, u, sku) for u in users))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == stock
    assert all(d["error"] == "INSUFFICIENT_STOCK" for s, d in results if s != 201)
    assert len(statuses) == buyers
    assert await sku_row(db, sku) == {"on_hand": stock, "reserved": stock, "sold": 0}


async def test_idempotency_key_returns_the_same_order(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user, other = (
        await make_user(db, "merchant"),
        await make_user(db),
        await make_user(db),
    )
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    body = {"items": [{"sku_id": sku, "quantity": 1}], "shipping_address": ADDRESS}
    headers = {**auth(tokens, user), "Idempotency-Key": "k-1"}
    first = await client.post("/api/v1/orders", json=body, headers=headers)
    again = await client.post("/api/v1/orders", json=body, headers=headers)
    assert first.status == 201 and again.status == 200
    a, b = (await first.json())["data"], (await again.json())["data"]
    assert a["order_id"] == b["order_id"] and a["payment_id"] == b["payment_id"]
    resp = await client.post(
        "/api/v1/orders", json=body, headers={**auth(tokens, other), "Idempotency-Key": "k-1"}
    )
    assert resp.status == 201 and (await resp.json())["data"]["order_id"] != a["order_id"]
    assert (await sku_row(db, sku))["reserved"] == 2


async def test_other_users_order_is_not_found(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user, other = (
        await make_user(db, "merchant"),
        await make_user(db),
        await make_user(db),
    )
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    _, data = await place_order(client, tokens, user, sku)
    oid = data["data"]["order_id"]
    h = auth(tokens, other)
    assert (await client.get(f"/api/v1/orders/{oid}", headers=h)).status == 404
    assert (await client.get(f"/api/v1/orders/{oid}/logs", headers=h)).status == 404
    assert (await client.post(f"/api/v1/orders/{oid}/cancel", headers=h)).status == 404
    resp = await client.post(
        f"/api/v1/orders/{oid}/pay", json={"payment_method": "alipay"}, headers=h
    )
    assert resp.status == 404
    resp = await client.get("/api/v1/orders", headers=h)
    assert (await resp.json())["data"]["total"] == 0


async def test_cancel_releases_stock_and_logs(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    _, data = await place_order(client, tokens, user, sku, 3)
    oid = data["data"]["order_id"]
    h = auth(tokens, user)
    resp = await client.post(f"/api/v1/orders/{oid}/cancel", json={"version": 7}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "VERSION_CONFLICT"
    resp = await client.post(
        f"/api/v1/orders/{oid}/cancel", json={"version": 1, "reason": "changed my mind"}, headers=h
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"] == {"order_id": oid, "status": "cancelled", "version": 2}
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
    resp = await client.post(f"/api/v1/orders/{oid}/cancel", headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    resp = await client.post(
        f"/api/v1/orders/{oid}/pay", json={"payment_method": "alipay"}, headers=h
    )
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    logs = await db.fetch(
        "SELECT actor_id, from_status, to_status, note FROM order_logs "
        "WHERE order_id = $1 ORDER BY id",
        oid,
    )
    assert [(r["from_status"], r["to_status"]) for r in logs] == [
        (None, "pending_payment"),
        ("pending_payment", "cancelled"),
    ]
    assert logs[1]["actor_id"] == user and logs[1]["note"] == "changed my mind"
    pay = await db.fetchval("SELECT status FROM pay_orders WHERE order_id = $1", oid)
    assert pay == "closed"


async def test_ship_deliver_confirm_permissions_and_transitions(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, other_merchant, user = (
        await make_user(db, "merchant"),
        await make_user(db, "merchant"),
        await make_user(db),
    )
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    _, data = await place_order(client, tokens, user, sku, 2)
    oid, pay_id = data["data"]["order_id"], data["data"]["payment_id"]
    url = f"/api/v1/orders/{oid}"
    ship = {
        "shipping_company": "SF Express",
        "tracking_number": "SF123",
        "estimated_delivery": "2026-12-01",
    }
    mh = auth(tokens, merchant, "merchant")
    resp = await client.post(url + "/ship", json=ship, headers=mh)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    resp = await client.post(url + "/confirm", headers=auth(tokens, user))
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"

    await pay_via_sandbox(client, tokens, user, pay_id)
    assert await sku_row(db, sku) == {"on_hand": 8, "reserved": 0, "sold": 2}
    assert (await client.post(url + "/ship", json=ship, headers=auth(tokens, user))).status == 403
    resp = await client.post(
        url + "/ship", json=ship, headers=auth(tokens, other_merchant, "merchant")
    )
    assert resp.status == 404  # another shop's order: as if it did not exist
    resp = await client.post(url + "/ship", json={"shipping_company": "SF"}, headers=mh)
    assert resp.status == 422
    resp = await client.post(url + "/ship", json={**ship, "version": 1}, headers=mh)
    assert resp.status == 409 and (await resp.json())["error"] == "VERSION_CONFLICT"
    resp = await client.post(url + "/ship", json={**ship, "version": 2}, headers=mh)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["version"] == 3
    resp = await client.post(url + "/ship", json=ship, headers=mh)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    resp = await client.post(url + "/deliver", headers=mh)
    assert resp.status == 200
    resp = await client.post(url + "/confirm", headers=auth(tokens, merchant, "merchant"))
    assert resp.status == 404  # not the buyer
    resp = await client.post(url + "/confirm", json={"version": 4}, headers=auth(tokens, user))
    assert resp.status == 200 and (await resp.json())["data"]["status"] == "completed"
    detail = (await (await client.get(url, headers=auth(tokens, user))).json())["data"]
    assert detail["shipping_info"]["tracking_number"] == "SF123"
    assert detail["payment_info"]["status"] == "success"
    assert detail["payment_info"]["transaction_id"]
    logs = await db.fetch("SELECT to_status FROM order_logs WHERE order_id = $1 ORDER BY id", oid)
    assert [r["to_status"] for r in logs] == [
        "pending_payment",
        "paid",
        "shipped",
        "delivered",
        "completed",
    ]


async def test_unpaid_orders_closed_once_by_two_sweepers(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    oids = []
    for _ in range(3):
        _, data = await place_order(client, tokens, user, sku, 2)
        oids.append(data["data"]["order_id"])
    await db.execute(
        "UPDATE orders SET payment_deadline = now() - interval '1 s' WHERE id = ANY($1::text[])",
        oids,
    )
    results = await asyncio.gather(orders.close_expired_orders(db), orders.close_expired_orders(db))
    assert sum(results) <= 3  # a consumer's store sweeper may have taken some
    for _ in range(50):
        if (await sku_row(db, sku))["reserved"] == 0:
            break
        await asyncio.sleep(0.05)
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
    rows = await db.fetch("SELECT status, version FROM orders WHERE id = ANY($1::text[])", oids)
    assert {(r["status"], r["version"]) for r in rows} == {("cancelled", 2)}
    logs = await db.fetchval(
        "SELECT count(*) FROM order_logs WHERE order_id = ANY($1::text[]) "
        "AND to_status = 'cancelled'",
        oids,
    )
    assert logs == 3
    releases = await db.fetchval(
        "SELECT count(*) FROM inventory_ledger "
        "WHERE order_id = ANY($1::text[]) AND reason LIKE 'release:%'",
        oids,
    )
    assert releases == 3


async def test_concurrent_retries_with_one_idempotency_key_reserve_once(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    body = {"items": [{"sku_id": sku, "quantity": 1}], "shipping_address": ADDRESS}
    headers = {**auth(tokens, user), "Idempotency-Key": "same"}
    responses = await asyncio.gather(
        *(client.post("/api/v1/orders", json=body, headers=headers) for _ in range(4))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(201) == 1
    assert set(statuses) <= {200, 201, 409}
    assert (await sku_row(db, sku))["reserved"] == 1
    assert await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", user) == 1


async def test_other_merchants_order_is_not_found(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, other_merchant, user = (
        await make_user(db, "merchant"),
        await make_user(db, "merchant"),
        await make_user(db),
    )
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    _, data = await place_order(client, tokens, user, sku)
    oid = data["data"]["order_id"]
    await pay_via_sandbox(client, tokens, user, data["data"]["payment_id"])
    ship = {"shipping_company": "SF", "tracking_number": "SF1"}
    oh = auth(tokens, other_merchant, "merchant")
    for url, body in ((f"/api/v1/orders/{oid}/ship", ship), (f"/api/v1/orders/{oid}/deliver", {})):
        resp = await client.post(url, json=body, headers=oh)
        missing = await client.post(url.replace(oid, "1" + oid), json=body, headers=oh)
        assert resp.status == missing.status == 404, await resp.text()
        assert (await resp.json())["error"] == (await missing.json())["error"] == "NOT_FOUND"
    resp = await client.post(
        f"/api/v1/orders/{oid}/ship", json=ship, headers=auth(tokens, merchant, "merchant")
    )
    assert resp.status == 200


async def test_per_user_per_sku_cap_on_held_units(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user, other = (
        await make_user(db, "merchant"),
        await make_user(db),
        await make_user(db),
    )
    default = app[appkeys.SETTINGS].max_per_user_default
    pid, (sku,) = await make_product(db, merchant, [(100, 5000)])
    # One order of 999 units, or two lines of one SKU adding up past the line cap: refused.
    status, data = await place_order(client, tokens, user, sku, orders.MAX_LINE_QUANTITY)
    assert status == 409 and data["error"] == "PURCHASE_LIMIT_EXCEEDED", data
    assert data["data"] == {"sku_id": sku, "limit": default, "held": 0}
    body = {
        "items": [{"sku_id": sku, "quantity": 600}, {"sku_id": sku, "quantity": 600}],
        "shipping_address": ADDRESS,
    }
    resp = await client.post("/api/v1/orders", json=body, headers=auth(tokens, user))
    assert resp.status == 422 and "items" in (await resp.json())["fields"]
    assert (await sku_row(db, sku))["reserved"] == 0

    # A per-product cap; concurrent orders of one user together stay within it.
    await db.execute("UPDATE products SET max_per_user = 5 WHERE id = $1", pid)
    results = await asyncio.gather(*(place_order(client, tokens, user, sku, 3) for _ in range(4)))
    assert sorted(s for s, _ in results) == [201, 409, 409, 409]
    assert all(d["error"] == "PURCHASE_LIMIT_EXCEEDED" for s, d in results if s == 409)
    status, data = await place_order(client, tokens, user, sku, 2)
    assert status == 201  # 3 + 2 = the cap
    status, data = await place_order(client, tokens, user, sku, 1)
    assert status == 409 and data["data"] == {"sku_id": sku, "limit": 5, "held": 5}
    assert (await place_order(client, tokens, other, sku, 5))[0] == 201  # per user
    # Cancelling gives the allowance back.
    oid = next(d["data"]["order_id"] for s, d in results if s == 201)
    resp = await client.post(f"/api/v1/orders/{oid}/cancel", headers=auth(tokens, user))
    assert resp.status == 200
    assert (await place_order(client, tokens, user, sku, 3))[0] == 201


async def test_merchant_sets_max_per_user_on_the_product(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    mh = auth(tokens, merchant, "merchant")
    resp = await client.post(
        "/api/v1/products",
        headers=mh,
        json={"name": "Capped", "price": 100, "stock": 100, "max_per_user": 2},
    )
    assert resp.status == 201, await resp.text()
    product = (await resp.json())["data"]
    assert product["max_per_user"] == 2
    sku = product["skus"][0]["id"]
    status, data = await place_order(client, tokens, user, sku, 3)
    assert status == 409 and data["data"]["limit"] == 2
    resp = await client.put(
        f"/api/v1/products/{product['id']}", headers=mh, json={"max_per_user": 3}
    )
    assert resp.status == 200 and (await resp.json())["data"]["max_per_user"] == 3
    assert (await place_order(client, tokens, user, sku, 3))[0] == 201
    resp = await client.put(
        f"/api/v1/products/{product['id']}", headers=mh, json={"max_per_user": None}
    )
    assert resp.status == 200 and (await resp.json())["data"]["max_per_user"] is None
    status, data = await place_order(client, tokens, user, sku, 1)
    default = app[appkeys.SETTINGS].max_per_user_default
    assert (status == 201) == (default >= 4)


async def test_the_gateway_runs_no_sweeper(app: web.Application) -> None:
    """Sweepers run in ``flashsale consume`` only, never in the gateway workers."""
    names = [ctx.__name__ for ctx in app.cleanup_ctx]
    assert names and not [n for n in names if "sweep" in n], names


async def test_flashsale_consume_closes_unpaid_orders_past_their_deadline(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService, consumer: None
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(100, 10)])
    _, data = await place_order(client, tokens, user, sku, 2)
    oid = data["data"]["order_id"]
    await db.execute(
        "UPDATE orders SET payment_deadline = now() - interval '1 s' WHERE id = $1", oid
    )

    async def closed() -> bool:
        status: str = await db.fetchval("SELECT status FROM orders WHERE id = $1", oid)
        return status == "cancelled"

    await eventually(closed)
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
