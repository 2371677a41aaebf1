from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import presale
from flashsale.auth import TokenService
from gateway import appkeys
from tests.conftest import auth, make_user

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


def _iso(delta_s: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_s)).isoformat()


async def _presale(
    client: Client,
    db: asyncpg.Pool,
    tokens: TokenService,
    *,
    total: int,
    price: int | None = None,
    starts_in_s: float = -60,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """A merchant's product with one SKU and a presale of ``total`` units on it."""
    merchant = await make_user(db, "merchant")
    h = auth(tokens, merchant, "merchant")
    resp = await client.post(
        "/api/v1/products",
        headers=h,
        json={"name": "Pre " + secrets.token_hex(4), "price": 5000, "stock": 0},
    )
    assert resp.status == 201
    product = (await resp.json())["data"]
    body: dict[str, Any] = {
        "sku_id": product["skus"][0]["id"],
        "total": total,
        "starts_at": _iso(starts_in_s),
        "ends_at": _iso(3600),
    }
    if price is not None:
        body["price"] = price
    resp = await client.post("/api/v1/presales", headers=h, json=body)
    assert resp.status == 201, await resp.text()
    return product, (await resp.json())["data"], h


async def _buyer(db: asyncpg.Pool, tokens: TokenService) -> tuple[int, dict[str, str]]:
    uid = await make_user(db)
    return uid, auth(tokens, uid)


async def _available(client: Client, campaign_id: int) -> int:
    resp = await client.get(f"/api/v1/presales/{campaign_id}")
    value: int = (await resp.json())["data"]["available"]
    return value


async def test_preorder_lifecycle(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    product, campaign, merchant_h = await _presale(client, db, tokens, total=10, price=4500)
    assert campaign["available"] == 10 and campaign["price"] == 4500
    uid, h = await _buyer(db, tokens)
    resp = await client.post(
        "/api/v1/preorder",
        headers=h,
        json={"product_id": product["id"], "quantity": 2, "user_id": uid},
    )
    assert resp.status == 201, await resp.text()
    order = (await resp.json())["data"]
    assert order["status"] == "pending" and order["total_amount"] == 9000
    assert order["user_id"] == uid and len(order["order_id"]) == 25
    assert await _available(client, campaign["id"]) == 8
    url = f"/api/v1/preorder/{order['order_id']}"

    resp = await client.put(url, headers=h, json={"status": "shipped"})
    assert resp.status == 403
    resp = await client.put(url, headers=merchant_h, json={"status": "shipped"})
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    async with db.acquire() as conn:  # what a verified payment does
        assert await presale.mark_paid(conn, order["order_id"]) is True
    resp = await client.put(url, headers=h, json={"status": "completed"})
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    resp = await client.put(url, headers=merchant_h, json={"status": "shipped", "version": 1})
    assert resp.status == 409 and (await resp.json())["error"] == "VERSION_CONFLICT"
    resp = await client.put(url, headers=merchant_h, json={"status": "shipped", "version": 2})
    assert resp.status == 200
    resp = await client.delete(url, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    resp = await client.put(url, headers=h, json={"status": "completed"})
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data["status"] == "completed" and data["version"] == 4 and data["paid_at"]
    assert await _available(client, campaign["id"]) == 8


async def test_preorder_validation_and_not_found(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, _, _ = await _presale(client, db, tokens, total=1)
    uid, h = await _buyer(db, tokens)
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": "x", "quantity": 0, "extra": 1}
    )
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"product_id", "quantity", "extra"}
    resp = await client.post(
        "/api/v1/preorder",
        headers=h,
        json={"product_id": product["id"], "quantity": 1, "user_id": uid + 1},
    )
    assert resp.status == 403
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": 10**12, "quantity": 1}
    )
    assert resp.status == 404 and (await resp.json())["error"] == "PRESALE_NOT_FOUND"
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 2}
    )
    assert resp.status == 409 and (await resp.json())["error"] == "INSUFFICIENT_STOCK"
    assert (await resp.json())["data"] == {"available": 1}
    resp = await client.put("/api/v1/preorder/123", headers=h, json={"status": "bogus"})
    assert resp.status == 422
    resp = await client.post("/api/v1/preorder", json={"product_id": 1, "quantity": 1})
    assert resp.status == 401


async def test_presale_not_open(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    product, _, _ = await _presale(client, db, tokens, total=5, starts_in_s=600)
    _, h = await _buyer(db, tokens)
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 1}
    )
    assert resp.status == 409 and (await resp.json())["error"] == "PRESALE_NOT_ACTIVE"


async def test_campaign_permissions(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    product, _, _ = await _presale(client, db, tokens, total=1)
    other = await make_user(db, "merchant")
    body = {"sku_id": product["skus"][0]["id"], "total": 3, "ends_at": _iso(60)}
    resp = await client.post("/api/v1/presales", headers=auth(tokens, other, "merchant"), json=body)
    assert resp.status == 403
    _, h = await _buyer(db, tokens)
    assert (await client.post("/api/v1/presales", headers=h, json=body)).status == 403
    admin = await make_user(db, "admin")
    resp = await client.post(
        "/api/v1/presales",
        headers=auth(tokens, admin, "admin"),
        json={**body, "starts_at": _iso(120)},
    )
    assert resp.status == 422 and "ends_at" in (await resp.json())["fields"]


async def test_other_users_preorder_is_404(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, _, merchant_h = await _presale(client, db, tokens, total=5)
    _, h = await _buyer(db, tokens)
    _, stranger = await _buyer(db, tokens)
    other_merchant = auth(tokens, await make_user(db, "merchant"), "merchant")
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 1}
    )
    url = f"/api/v1/preorder/{(await resp.json())['data']['order_id']}"
    for headers in (stranger, other_merchant):
        assert (await client.get(url, headers=headers)).status == 404
        assert (await client.put(url, headers=headers, json={"status": "paid"})).status == 404
        assert (await client.delete(url, headers=headers)).status == 404
    assert (await client.get(url, headers=h)).status == 200
    assert (await client.get(url, headers=merchant_h)).status == 200
    assert (await client.get("/api/v1/preorder/abc", headers=h)).status == 404


async def test_list_preorders(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    product, _, _ = await _presale(client, db, tokens, total=10)
    uid, h = await _buyer(db, tokens)
    other, other_h = await _buyer(db, tokens)
    ids = []
    for headers in (h, h, other_h):
        resp = await client.post(
            "/api/v1/preorder", headers=headers, json={"product_id": product["id"], "quantity": 1}
        )
        ids.append((await resp.json())["data"]["order_id"])
    old = datetime.now(UTC) - timedelta(days=3)
    await db.execute("UPDATE presale_orders SET created_at = $2 WHERE id = $1", ids[0], old)

    async def listed(headers: dict[str, str], **params: str) -> tuple[int, list[str]]:
        resp = await client.get("/api/v1/preorder", headers=headers, params=params)
        if resp.status != 200:
            return resp.status, []
        return 200, [o["order_id"] for o in (await resp.json())["data"]["orders"]]

    assert await listed(h) == (200, [ids[1], ids[0]])
    assert await listed(h, user_id=str(uid)) == (200, [ids[1], ids[0]])
    assert (await listed(h, user_id=str(other)))[0] == 403
    assert await listed(h, **{"from": _iso(-3600)}) == (200, [ids[1]])
    assert await listed(h, to=(old + timedelta(hours=1)).isoformat()) == (200, [ids[0]])
    assert await listed(h, to=old.date().isoformat()) == (200, [ids[0]])
    admin_h = auth(tokens, await make_user(db, "admin"), "admin")
    assert await listed(admin_h, user_id=str(other)) == (200, [ids[2]])
    assert (await listed(h, **{"from": "yesterday"}))[0] == 422
    resp = await client.get("/api/v1/preorder", headers=h, params={"limit": "1", "page": "2"})
    data = (await resp.json())["data"]
    assert data["total"] == 2 and [o["order_id"] for o in data["orders"]] == [ids[0]]


async def test_concurrent_preorders_exactly_stock(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    stock, buyers = 7, 40
    product, campaign, _ = await _presale(client, db, tokens, total=stock)
    headers = [(await _buyer(db, tokens))[1] for _ in range(buyers)]

    async def buy(h: dict[str, str]) -> int:
        resp = await client.post(
            "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 1}
        )
        if resp.status == 409:
            assert (await resp.json())["error"] == "INSUFFICIENT_STOCK"
        return resp.status

    statuses = await asyncio.gather(*(buy(h) for h in headers))
    assert statuses.count(201) == stock
    assert statuses.count(409) == buyers - stock
    assert await _available(client, campaign["id"]) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM presale_orders WHERE campaign_id = $1", campaign["id"]
        )
        == stock
    )


async def test_cancel_returns_stock_once(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, campaign, _ = await _presale(client, db, tokens, total=5)
    _, h = await _buyer(db, tokens)
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 3}
    )
    url = f"/api/v1/preorder/{(await resp.json())['data']['order_id']}"
    assert await _available(client, campaign["id"]) == 2
    results = await asyncio.gather(
        client.delete(url, headers=h),
        client.delete(url, headers=h),
        client.put(url, headers=h, json={"status": "cancelled"}),
    )
    assert [r.status for r in results] == [200, 200, 200]
    bodies = [await r.json() for r in results]
    assert all(b["data"]["status"] == "cancelled" for b in bodies)
    deletes = [b["message"] for b in bodies[:2]]
    assert deletes.count("cancelled") <= 1
    assert await _available(client, campaign["id"]) == 5
    async with db.acquire() as conn:
        assert await presale.mark_paid(conn, url.rsplit("/", 1)[-1]) is False
    # The returned units can be pre-occupied again.
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 5}
    )
    assert resp.status == 201


async def test_buyer_cannot_mark_own_preorder_paid(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, _, merchant_h = await _presale(client, db, tokens, total=5)
    _, h = await _buyer(db, tokens)
    admin_h = auth(tokens, await make_user(db, "admin"), "admin")
    resp = await client.post(
        "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": 1}
    )
    order_id = (await resp.json())["data"]["order_id"]
    url = f"/api/v1/preorder/{order_id}"
    for headers in (h, merchant_h, admin_h):
        resp = await client.put(url, headers=headers, json={"status": "paid"})
        assert resp.status == 403, await resp.text()
        assert (await resp.json())["error"] == "PAYMENT_REQUIRED"
    row = await db.fetchrow("SELECT status, paid_at FROM presale_orders WHERE id = $1", order_id)
    assert row is not None and row["status"] == "pending" and row["paid_at"] is None
    async with db.acquire() as conn:
        assert await presale.mark_paid(conn, order_id) is True
        assert await presale.mark_paid(conn, order_id) is False
    data = (await (await client.get(url, headers=h)).json())["data"]
    assert data["status"] == "paid" and data["paid_at"] and data["version"] == 2


async def test_unpaid_preorders_expire_and_return_units_once(
    client: Client, app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, campaign, _ = await _presale(client, db, tokens, total=10)
    _, h = await _buyer(db, tokens)
    ids = []
    for qty in (2, 3, 1):
        resp = await client.post(
            "/api/v1/preorder", headers=h, json={"product_id": product["id"], "quantity": qty}
        )
        data = (await resp.json())["data"]
        hold_s = app[appkeys.SETTINGS].presale_hold_s
        expires = datetime.fromisoformat(data["expires_at"])
        assert timedelta(0) < expires - datetime.now(UTC) <= timedelta(seconds=hold_s)
        ids.append(data["order_id"])
    assert await _available(client, campaign["id"]) == 4
    await db.execute(
        "UPDATE presale_orders SET expires_at = now() - interval '1 s' WHERE id = ANY($1)",
        ids[:2],
    )
    async with db.acquire() as conn:  # expired but not swept yet: no longer payable
        assert await presale.mark_paid(conn, ids[0]) is False
    results = await asyncio.gather(
        presale.cancel_expired(db), presale.cancel_expired(db), presale.cancel_expired(db)
    )
    assert sum(results) <= 2  # a consumer's store sweeper may have taken some
    for _ in range(50):
        if await _available(client, campaign["id"]) == 9:
            break
        await asyncio.sleep(0.05)
    assert await _available(client, campaign["id"]) == 9
    rows = await db.fetch("SELECT id, status FROM presale_orders WHERE id = ANY($1)", ids)
    assert {r["id"]: r["status"] for r in rows} == {
        ids[0]: "cancelled",
        ids[1]: "cancelled",
        ids[2]: "pending",
    }
    assert await presale.cancel_expired(db) == 0
    assert await _available(client, campaign["id"]) == 9


async def test_per_user_cap_on_unpaid_preorders(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    product, _, _ = await _presale(client, db, tokens, total=50)
    await db.execute("UPDATE products SET max_per_user = 3 WHERE id = $1", product["id"])
    _, h = await _buyer(db, tokens)
    _, other = await _buyer(db, tokens)

    async def buy(headers: dict[str, str], qty: int) -> tuple[int, dict[str, Any]]:
        resp = await client.post(
            "/api/v1/preorder", headers=headers, json={"product_id": product["id"], "quantity": qty}
        )
        return resp.status, await resp.json()

    results = await asyncio.gather(*(buy(h, 2) for _ in range(4)))
    assert sorted(s for s, _ in results) == [201, 409, 409, 409]
    assert {b["error"] for s, b in results if s == 409} == {"PURCHASE_LIMIT_EXCEEDED"}
    assert (await buy(h, 1))[0] == 201
    assert (await buy(other, 3))[0] == 201
    first = next(b["data"]["order_id"] for s, b in results if s == 201)
    assert (await client.delete(f"/api/v1/preorder/{first}", headers=h)).status == 200
    assert (await buy(h, 2))[0] == 201
