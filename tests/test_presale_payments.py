"""Presale orders are paid through the payment path only (verified notification), a paid
presale order is refunded when it is cancelled, and without a provider no order hands out a
sandbox payment URL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import payments
from flashsale.auth import TokenService
from flashsale.settings import Settings
from gateway import appkeys
from gateway.app import create_app
from tests.conftest import auth, make_user
from tests.flashkit import GatewayServer
from tests.store_helpers import make_product, pay_via_sandbox, place_order

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


def signed(app: web.Application, fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "sign": payments.sign(app[appkeys.SETTINGS].payment_hmac_key, fields)}


async def _preorder(
    client: Client, db: asyncpg.Pool, tokens: TokenService, *, price: int = 4500, qty: int = 2
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A buyer's pending presale order of ``qty`` units at ``price``; (campaign id, order,
    merchant headers)."""
    merchant = await make_user(db, "merchant")
    mh = auth(tokens, merchant, "merchant")
    resp = await client.post(
        "/api/v1/products",
        headers=mh,
        json={"name": "Pre " + secrets.token_hex(4), "price": 5000, "stock": 0},
    )
    assert resp.status == 201, await resp.text()
    product = (await resp.json())["data"]
    ends = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    resp = await client.post(
        "/api/v1/presales",
        headers=mh,
        json={"sku_id": product["skus"][0]["id"], "total": 10, "price": price, "ends_at": ends},
    )
    assert resp.status == 201, await resp.text()
    campaign = (await resp.json())["data"]
    buyer = await make_user(db)
    resp = await client.post(
        "/api/v1/preorder",
        headers=auth(tokens, buyer),
        json={"product_id": product["id"], "quantity": qty},
    )
    assert resp.status == 201, await resp.text()
    return campaign["id"], (await resp.json())["data"], mh


async def _available(client: Client, campaign_id: int) -> int:
    value: int = (await (await client.get(f"/api/v1/presales/{campaign_id}")).json())["data"][
        "available"
    ]
    return value


async def _create_pay(
    client: Client, tokens: TokenService, order: dict[str, Any], **extra: Any
) -> Any:
    body = {
        "order_id": order["order_id"],
        "amount": order["total_amount"],
        "payment_method": "alipay",
        **extra,
    }
    return await client.post(
        "/api/v1/payment/create", json=body, headers=auth(tokens, order["user_id"])
    )


# --- finding 1: a presale order is paid through the payment path, once --------------------


async def test_presale_order_paid_by_verified_payment_exactly_once(
    client: Client, app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    campaign_id, order, _ = await _preorder(client, db, tokens, price=4500, qty=2)
    oid, h = order["order_id"], auth(tokens, order["user_id"])
    resp = await _create_pay(client, tokens, order, amount=1)
    assert resp.status == 409 and (await resp.json())["error"] == "AMOUNT_MISMATCH"
    resp = await client.post(
        "/api/v1/payment/create",
        json={"order_id": oid, "payment_method": "alipay"},
        headers=auth(tokens, await make_user(db)),
    )
    assert resp.status == 404  # someone else's presale order
    resp = await _create_pay(client, tokens, order)
    assert resp.status == 200, await resp.text()
    pay = (await resp.json())["data"]
    assert pay["order_id"] == oid and pay["amount"] == 9000
    assert pay["payment_url"].endswith(pay["payment_id"]) and pay["expires_in"] > 0
    resp = await _create_pay(client, tokens, order, payment_method="wechat")
    assert (await resp.json())["data"]["payment_id"] == pay["payment_id"]  # reused
    page = (await (await client.get(pay["payment_url"], headers=h)).json())["data"]
    assert page["order_id"] == oid and page["status"] == "pending"

    result = await pay_via_sandbox(client, tokens, order["user_id"], pay["payment_id"])
    assert result["result"]["order_status"] == "paid"
    note = result["notification"]
    for _ in range(3):  # the provider repeats itself: nothing changes
        resp = await client.post("/api/v1/payment/notify", json=note)
        assert resp.status == 200 and (await resp.json())["data"]["duplicate"] is True
    row = await db.fetchrow(
        "SELECT status, version, paid_at FROM presale_orders WHERE id = $1", oid
    )
    assert row is not None and row["status"] == "paid" and row["version"] == 2 and row["paid_at"]
    pays = await db.fetch(
        "SELECT status, amount_cents FROM pay_orders WHERE presale_order_id = $1", oid
    )
    assert [tuple(r) for r in pays] == [("success", 9000)]
    accepted = await db.fetchval(
        "SELECT count(*) FROM payment_notifications WHERE payment_id = $1 AND accepted",
        pay["payment_id"],
    )
    assert accepted == 1
    assert await _available(client, campaign_id) == 8
    # Paid: no second payment can be started.
    resp = await _create_pay(client, tokens, order)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    # A signed "failed" for the same payment after success changes nothing either.
    late = signed(app, {**{k: v for k, v in note.items() if k != "sign"}, "status": "failed"})
    await client.post("/api/v1/payment/notify", json=late)
    assert await db.fetchval("SELECT status FROM presale_orders WHERE id = $1", oid) == "paid"


async def test_presale_notification_refusals(
    client: Client, app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, order, _ = await _preorder(client, db, tokens, price=1000, qty=1)
    oid = order["order_id"]
    pay = (await (await _create_pay(client, tokens, order)).json())["data"]
    fields = {
        "payment_id": pay["payment_id"],
        "order_id": oid,
        "status": "success",
        "amount": 1000,
        "transaction_id": "T-pre",
    }
    resp = await client.post("/api/v1/payment/notify", json={**signed(app, fields), "amount": 1})
    assert resp.status == 400 and (await resp.json())["error"] == "BAD_SIGNATURE"
    resp = await client.post("/api/v1/payment/notify", json=signed(app, {**fields, "amount": 1}))
    assert resp.status == 409 and (await resp.json())["error"] == "AMOUNT_MISMATCH"
    resp = await client.post(
        "/api/v1/payment/notify", json=signed(app, {**fields, "order_id": "OTHER"})
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_MISMATCH"
    assert await db.fetchval("SELECT status FROM presale_orders WHERE id = $1", oid) == "pending"
    # Someone else cannot approve it in the sandbox.
    resp = await client.post(
        f"/api/v1/payment/sandbox/{pay['payment_id']}/approve",
        headers=auth(tokens, await make_user(db)),
    )
    assert resp.status == 404
    resp = await client.post("/api/v1/payment/notify", json=signed(app, fields))
    assert resp.status == 200 and (await resp.json())["data"]["order_status"] == "paid"


async def test_expired_or_cancelled_presale_order_cannot_be_paid(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    # Cancelled before any payment: no payment can be started.
    _, order, _ = await _preorder(client, db, tokens)
    h = auth(tokens, order["user_id"])
    url = f"/api/v1/preorder/{order['order_id']}"
    assert (await client.delete(url, headers=h)).status == 200
    resp = await _create_pay(client, tokens, order)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"

    # Cancelled with a payment under way: the payment is closed, a late approval refused.
    _, order, _ = await _preorder(client, db, tokens)
    h = auth(tokens, order["user_id"])
    pay = (await (await _create_pay(client, tokens, order)).json())["data"]
    url = f"/api/v1/preorder/{order['order_id']}"
    assert (await client.delete(url, headers=h)).status == 200
    status = await db.fetchval("SELECT status FROM pay_orders WHERE id = $1", pay["payment_id"])
    assert status == "closed"
    resp = await client.post(f"/api/v1/payment/sandbox/{pay['payment_id']}/approve", headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAYABLE"
    assert (await (await client.get(url, headers=h)).json())["data"]["status"] == "cancelled"
    await _refunded_at_once(db, pay, await resp.json())

    # Expired (not swept yet): neither a new payment nor an approval of an open one.
    _, order, _ = await _preorder(client, db, tokens)
    h = auth(tokens, order["user_id"])
    pay = (await (await _create_pay(client, tokens, order)).json())["data"]
    await db.execute(
        "UPDATE presale_orders SET expires_at = now() - interval '1 s' WHERE id = $1",
        order["order_id"],
    )
    resp = await _create_pay(client, tokens, order)
    assert resp.status == 409 and (await resp.json())["error"] == "PRESALE_ORDER_EXPIRED"
    resp = await client.post(f"/api/v1/payment/sandbox/{pay['payment_id']}/approve", headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAYABLE"
    status = await db.fetchval("SELECT status FROM presale_orders WHERE id = $1", order["order_id"])
    assert status in ("pending", "cancelled")  # the app's sweeper may have taken it
    await _refunded_at_once(db, pay, await resp.json())


async def _refunded_at_once(db: asyncpg.Pool, pay: dict[str, Any], refusal: Any) -> None:
    """The approval came too late: the provider took the money and gave it all back."""
    assert refusal["data"]["refund_amount"] == pay["amount"]
    assert refusal["data"]["order_status"] in ("cancelled", "expired")
    status = await db.fetchval("SELECT status FROM pay_orders WHERE id = $1", pay["payment_id"])
    refunds = await db.fetch(
        "SELECT id, amount_cents FROM refunds WHERE pay_order_id = $1", pay["payment_id"]
    )
    assert status == "refunded"
    assert [(r["id"], r["amount_cents"]) for r in refunds] == [
        (refusal["data"]["refund_id"], pay["amount"])
    ]


async def test_pay_orders_name_exactly_one_order(db: asyncpg.Pool) -> None:
    user = await make_user(db)
    for order_id, presale_order_id in ((None, None), ("A", "B")):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(
                "INSERT INTO pay_orders (id, order_id, presale_order_id, user_id, amount_cents,"
                " method, expires_at) VALUES ($1, $2, $3, $4, 1, 'alipay', now())",
                "PAYX" + secrets.token_hex(6),
                order_id,
                presale_order_id,
                user,
            )


# --- finding 3: cancelling a paid presale order refunds it in the same transaction -------


async def test_cancel_paid_presale_order_refunds_in_full_once(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    campaign_id, order, _ = await _preorder(client, db, tokens, price=3000, qty=3)
    oid, h = order["order_id"], auth(tokens, order["user_id"])
    pay = (await (await _create_pay(client, tokens, order)).json())["data"]
    await pay_via_sandbox(client, tokens, order["user_id"], pay["payment_id"])
    assert await _available(client, campaign_id) == 7
    url = f"/api/v1/preorder/{oid}"
    results = await asyncio.gather(
        client.delete(url, headers=h),
        client.delete(url, headers=h),
        client.put(url, headers=h, json={"status": "cancelled"}),
    )
    assert [r.status for r in results] == [200, 200, 200]
    bodies = [await r.json() for r in results]
    assert all(b["data"]["status"] == "cancelled" for b in bodies)
    assert all(b["data"]["refunded_amount"] == 9000 for b in bodies)
    refunds = await db.fetch(
        "SELECT amount_cents, pay_order_id, status FROM refunds WHERE presale_order_id = $1", oid
    )
    assert [tuple(r) for r in refunds] == [(9000, pay["payment_id"], "completed")]
    assert await _available(client, campaign_id) == 10


async def test_merchant_cancelling_paid_presale_order_refunds_the_buyer(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    campaign_id, order, mh = await _preorder(client, db, tokens, price=2000, qty=1)
    oid = order["order_id"]
    pay = (await (await _create_pay(client, tokens, order)).json())["data"]
    await pay_via_sandbox(client, tokens, order["user_id"], pay["payment_id"])
    resp = await client.delete(f"/api/v1/preorder/{oid}", headers=mh)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["message"] == "cancelled and refunded"
    total = await db.fetchval(
        "SELECT sum(amount_cents) FROM refunds WHERE presale_order_id = $1", oid
    )
    assert total == 2000 and await _available(client, campaign_id) == 10


async def test_payment_racing_a_cancel_never_keeps_money_without_units(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    for _ in range(3):
        campaign_id, order, _ = await _preorder(client, db, tokens, price=1500, qty=2)
        oid, h = order["order_id"], auth(tokens, order["user_id"])
        pay = (await (await _create_pay(client, tokens, order)).json())["data"]
        approve, cancel = await asyncio.gather(
            client.post(f"/api/v1/payment/sandbox/{pay['payment_id']}/approve", headers=h),
            client.delete(f"/api/v1/preorder/{oid}", headers=h),
        )
        assert cancel.status == 200 and approve.status in (200, 409)
        row = await db.fetchrow(
            "SELECT status, refunded_cents FROM presale_orders WHERE id = $1", oid
        )
        assert row is not None and row["status"] == "cancelled"
        refunded = await db.fetchval(
            "SELECT coalesce(sum(amount_cents), 0) FROM refunds WHERE presale_order_id = $1", oid
        )
        # Paid first: the cancel refunded it; cancelled first: the payment, verified after
        # the cancel, was refunded at once. Either way the money is back, once.
        assert refunded == row["refunded_cents"] == 3000
        pays = await db.fetch("SELECT status FROM pay_orders WHERE presale_order_id = $1", oid)
        assert [p["status"] for p in pays] == ["success" if approve.status == 200 else "refunded"]
        assert await _available(client, campaign_id) == 10


# --- finding 2: without a provider, no sandbox payment URL is handed out -----------------


@pytest.fixture
async def none_client(base_settings: Settings) -> AsyncIterator[Client]:
    app = create_app(base_settings.with_(payment_provider="none"))
    async with TestClient(GatewayServer(app)) as c:
        yield c


async def test_without_provider_orders_carry_no_sandbox_url(
    none_client: Client, client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(1000, 10)])
    key = {"Idempotency-Key": "k-" + secrets.token_hex(4)}
    for _ in range(2):  # the first answer, then its idempotent replay
        resp = await none_client.post(
            "/api/v1/orders",
            json={
                "items": [{"sku_id": sku, "quantity": 1}],
                "shipping_address": {"name": "Z", "phone": "13800138000", "address": "1 Rd"},
            },
            headers={**auth(tokens, user), **key},
        )
        assert resp.status in (200, 201), await resp.text()
        data = (await resp.json())["data"]
        assert data["payment_id"] and data["payment_url"] is None
    # With the sandbox on, the URL is there and answers.
    status, body = await place_order(client, tokens, user, sku)
    assert status == 201
    url = body["data"]["payment_url"]
    assert url and (await client.get(url, headers=auth(tokens, user))).status == 200
    # A presale order cannot be paid without a provider either.
    _, order, _ = await _preorder(none_client, db, tokens)
    resp = await _create_pay(none_client, tokens, order)
    assert resp.status == 503 and (await resp.json())["error"] == "PAYMENT_PROVIDER_UNAVAILABLE"
