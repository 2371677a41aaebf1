"""Payments: sandbox provider, signed notifications (idempotent), refunds."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import payments
from flashsale.auth import TokenService
from gateway import appkeys
from tests.conftest import auth, make_user
from tests.store_helpers import make_product, pay_via_sandbox, place_order, sku_row

pytestmark = pytest.mark.integration


def signed(app: web.Application, fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "sign": payments.sign(app[appkeys.SETTINGS].payment_hmac_key, fields)}


async def _order(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
    price: int = 10000,
    quantity: int = 1,
) -> tuple[int, int, dict[str, Any]]:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(price, 10)])
    status, data = await place_order(client, tokens, user, sku, quantity)
    assert status == 201, data
    return user, sku, data["data"]


async def test_methods_and_create_payment(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    resp = await client.get("/api/v1/payment/methods")
    methods = (await resp.json())["data"]
    assert {"alipay", "wechat"} <= {m["method"] for m in methods}
    assert all(m["available"] for m in methods)
    # no image link: the gateway serves no payment brand art
    assert {k for m in methods for k in m} == {"method", "name", "available", "provider"}

    user, _, order = await _order(client, db, tokens)
    h = auth(tokens, user)
    body = {
        "order_id": order["order_id"],
        "amount": 10000,
        "payment_method": "wechat",
        "return_url": "https://shop.example/ok",
    }
    resp = await client.post("/api/v1/payment/create", json=body, headers=h)
    assert resp.status == 200, await resp.text()
    pay = (await resp.json())["data"]
    assert pay["payment_id"] == order["payment_id"]  # the pending pay order is reused
    assert 0 < pay["expires_in"] <= 900 and pay["payment_url"].endswith(pay["payment_id"])
    resp = await client.post(
        f"/api/v1/orders/{order['order_id']}/pay", json={"payment_method": "alipay"}, headers=h
    )
    assert resp.status == 200 and (await resp.json())["data"]["payment_method"] == "alipay"
    resp = await client.post("/api/v1/payment/create", json={**body, "amount": 1}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "AMOUNT_MISMATCH"
    resp = await client.post(
        "/api/v1/payment/create", json={**body, "payment_method": "cash"}, headers=h
    )
    assert resp.status == 422
    resp = await client.post(
        "/api/v1/payment/create", json=body, headers=auth(tokens, await make_user(db))
    )
    assert resp.status == 404
    resp = await client.get(f"/api/v1/payment/sandbox/{pay['payment_id']}", headers=h)
    assert resp.status == 200 and (await resp.json())["data"]["status"] == "pending"


async def test_notify_replayed_five_times_changes_state_once(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _user, sku, order = await _order(client, db, tokens, quantity=2)
    note = signed(
        app,
        {
            "payment_id": order["payment_id"],
            "order_id": order["order_id"],
            "status": "success",
            "amount": 20000,
            "transaction_id": "T-1",
            "paid_at": "2026-11-22T00:00:00Z",
        },
    )
    answers = []
    for _ in range(5):
        resp = await client.post("/api/v1/payment/notify", json=note)
        assert resp.status == 200, await resp.text()
        answers.append((await resp.json())["data"])
    assert [a["duplicate"] for a in answers] == [False, True, True, True, True]
    row = await db.fetchrow("SELECT status, version FROM orders WHERE id = $1", order["order_id"])
    assert row is not None and dict(row) == {"status": "paid", "version": 2}
    logs = await db.fetchval(
        "SELECT count(*) FROM order_logs WHERE order_id = $1 AND to_status = 'paid'",
        order["order_id"],
    )
    assert logs == 1
    assert await sku_row(db, sku) == {"on_hand": 8, "reserved": 0, "sold": 2}
    accepted = await db.fetchval(
        "SELECT count(*) FROM payment_notifications WHERE payment_id = $1 AND accepted",
        order["payment_id"],
    )
    assert accepted == 1


async def test_bad_signature_amount_and_order_rejected(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, _, order = await _order(client, db, tokens)
    fields = {
        "payment_id": order["payment_id"],
        "order_id": order["order_id"],
        "status": "success",
        "amount": 10000,
        "transaction_id": "T-2",
    }
    forged = {**signed(app, fields), "amount": 1}
    resp = await client.post("/api/v1/payment/notify", json=forged)
    assert resp.status == 400 and (await resp.json())["error"] == "BAD_SIGNATURE"
    resp = await client.post("/api/v1/payment/notify", json={**fields, "sign": "0" * 64})
    assert resp.status == 400
    resp = await client.post("/api/v1/payment/notify", json=signed(app, {**fields, "amount": 1}))
    assert resp.status == 409 and (await resp.json())["error"] == "AMOUNT_MISMATCH"
    resp = await client.post(
        "/api/v1/payment/notify", json=signed(app, {**fields, "order_id": "OTHER"})
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_MISMATCH"
    resp = await client.post("/api/v1/payment/notify", json={"payment_id": "x"})
    assert resp.status == 422
    status = await db.fetchval("SELECT status FROM orders WHERE id = $1", order["order_id"])
    assert status == "pending_payment"
    rejected = await db.fetch(
        "SELECT outcome FROM payment_notifications "
        "WHERE payment_id = $1 AND NOT accepted ORDER BY id",
        order["payment_id"],
    )
    # Signed notifications that cannot apply are kept; unsigned ones write nothing.
    assert [r["outcome"] for r in rejected] == ["AMOUNT_MISMATCH", "ORDER_MISMATCH"]
    # The genuine notification still goes through afterwards.
    resp = await client.post("/api/v1/payment/notify", json=signed(app, fields))
    assert resp.status == 200


async def test_sandbox_fail_then_pay_again(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, _, order = await _order(client, db, tokens)
    h = auth(tokens, user)
    resp = await client.post(f"/api/v1/payment/sandbox/{order['payment_id']}/fail", headers=h)
    assert resp.status == 200
    assert (await resp.json())["data"]["result"]["payment_status"] == "failed"
    resp = await client.post(
        f"/api/v1/orders/{order['order_id']}/pay", json={"payment_method": "wechat"}, headers=h
    )
    new_pay = (await resp.json())["data"]["payment_id"]
    assert new_pay != order["payment_id"]
    await pay_via_sandbox(client, tokens, user, new_pay)
    # A late approval of the failed attempt cannot pay the order twice.
    resp = await client.post(f"/api/v1/payment/sandbox/{order['payment_id']}/approve", headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAYABLE"
    resp = await client.post(
        f"/api/v1/payment/sandbox/{new_pay}/approve", headers=auth(tokens, await make_user(db))
    )
    assert resp.status == 404


async def test_refunds_before_shipping_are_whole_and_limited(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, sku, order = await _order(client, db, tokens, price=10000, quantity=3)
    h = auth(tokens, user)
    body = {"order_id": order["order_id"], "refund_amount": 10000, "reason": "damaged"}
    resp = await client.post("/api/v1/payment/refund", json=body, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    for amount, code in ((10000, "FULL_REFUND_REQUIRED"), (30001, "REFUND_EXCEEDS_PAID")):
        resp = await client.post(
            "/api/v1/payment/refund", json={**body, "refund_amount": amount}, headers=h
        )
        assert resp.status == 409 and (await resp.json())["error"] == code
    resp = await client.post("/api/v1/payment/refund", json={**body, "refund_amount": 0}, headers=h)
    assert resp.status == 422
    resp = await client.post(
        "/api/v1/payment/refund", json=body, headers=auth(tokens, await make_user(db))
    )
    assert resp.status == 404
    assert await sku_row(db, sku) == {"on_hand": 7, "reserved": 0, "sold": 3}
    resp = await client.post(
        "/api/v1/payment/refund", json={**body, "refund_amount": 30000}, headers=h
    )
    assert resp.status == 200, await resp.text()
    first = (await resp.json())["data"]
    assert first["refund_id"].startswith("REF") and first["status"] == "completed"
    assert first["estimated_arrival"] and first["order_status"] == "cancelled"
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
    resp = await client.post("/api/v1/payment/refund", json={**body, "refund_amount": 1}, headers=h)
    assert resp.status == 409
    resp = await client.post(
        "/api/v1/payment/refund", json={"order_id": order["order_id"], "reason": "again"}, headers=h
    )
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"
    total = await db.fetchval(
        "SELECT sum(amount_cents) FROM refunds WHERE order_id = $1", order["order_id"]
    )
    assert total == 30000


async def test_full_flow_create_pay_ship_confirm_refund(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, sku, order = await _order(client, db, tokens, price=25000, quantity=2)
    merchant = await db.fetchval(
        "SELECT p.merchant_id FROM skus s JOIN products p ON p.id = s.product_id WHERE s.id = $1",
        sku,
    )
    oid, h, mh = order["order_id"], auth(tokens, user), auth(tokens, merchant, "merchant")
    resp = await client.post(
        f"/api/v1/orders/{oid}/pay", json={"payment_method": "alipay"}, headers=h
    )
    pay = (await resp.json())["data"]
    page = await client.get(pay["payment_url"], headers=h)
    assert (await page.json())["data"]["amount"] == 50000
    await pay_via_sandbox(client, tokens, user, pay["payment_id"])
    resp = await client.post(
        f"/api/v1/orders/{oid}/ship",
        headers=mh,
        json={"shipping_company": "SF", "tracking_number": "SF9"},
    )
    assert resp.status == 200
    resp = await client.post(f"/api/v1/orders/{oid}/confirm", headers=h)
    assert resp.status == 200 and (await resp.json())["data"]["status"] == "completed"
    refund = {"order_id": oid, "refund_amount": 50000, "reason": "return"}
    resp = await client.post("/api/v1/payment/refund", headers=h, json=refund)
    assert resp.status == 409 and (await resp.json())["error"] == "RETURN_REQUIRED"
    admin = auth(tokens, await make_user(db, "admin"), "admin")  # approving the return
    resp = await client.post("/api/v1/payment/refund", headers=admin, json=refund)
    assert resp.status == 200
    detail = (await (await client.get(f"/api/v1/orders/{oid}", headers=h)).json())["data"]
    assert detail["status"] == "refunded" and detail["refunded_amount"] == 50000
    logs = await db.fetch("SELECT to_status FROM order_logs WHERE order_id = $1 ORDER BY id", oid)
    assert [r["to_status"] for r in logs] == [
        "pending_payment",
        "paid",
        "shipped",
        "completed",
        "refunded",
    ]
