"""Money safety of payments: the provider setting, who may refund, lock order, the notify key,
what an unsigned notification can do, and what the signature covers."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import payments
from flashsale.auth import TokenService
from flashsale.settings import Settings, SettingsError
from gateway import appkeys
from gateway.app import create_app
from tests.conftest import TEST_SECRET, auth, make_user
from tests.flashkit import GatewayServer
from tests.store_helpers import make_product, pay_via_sandbox, place_order, sku_row

ROOT = Path(__file__).resolve().parent.parent


def signed(app: web.Application, fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "sign": payments.sign(app[appkeys.SETTINGS].payment_hmac_key, fields)}


async def _order(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService, price: int = 10000
) -> tuple[int, int, dict[str, Any]]:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await make_product(db, merchant, [(price, 10)])
    status, data = await place_order(client, tokens, user, sku)
    assert status == 201, data
    return user, merchant, data["data"]


# --- finding 2: the sandbox provider is a setting, off unless asked ----------------------


@pytest.mark.unit
def test_payment_provider_setting() -> None:
    assert Settings.from_env({}).payment_provider == "none"
    on = Settings.from_env({"FLASHSALE_PAYMENT_PROVIDER": "sandbox"})
    assert on.payment_provider == "sandbox"
    assert Settings.from_env(on.to_env()) == on
    with pytest.raises(SettingsError, match="FLASHSALE_PAYMENT_PROVIDER"):
        Settings.from_env({"FLASHSALE_PAYMENT_PROVIDER": "paypal"})


@pytest.mark.unit
def test_compose_production_shape_has_no_sandbox() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("gateway", "consumers", "migrate"):
        env = compose["services"][name]["environment"]
        # the secrets are files only the containers have (compose secrets, *_FILE)
        concrete = {k: v for k, v in env.items() if "${" not in str(v) and not k.endswith("_FILE")}
        assert Settings.from_env(concrete).payment_provider == "none", name


@pytest.mark.unit
def test_banner_names_the_payment_provider(capsys: pytest.CaptureFixture[str]) -> None:
    from stack.up import _banner

    settings = Settings.from_env({}).with_(payment_provider="sandbox")
    _banner(settings, "http://127.0.0.1:1", {}, 0.0, 0.0, None)
    line = next(x for x in capsys.readouterr().out.splitlines() if "payments" in x)
    assert "sandbox" in line


@pytest.fixture
async def none_client(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(base_settings.with_(payment_provider="none"))
    async with TestClient(GatewayServer(app)) as c:
        yield c


@pytest.mark.integration
async def test_without_sandbox_its_routes_do_not_exist(
    none_client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    client = none_client
    user, _, order = await _order(client, db, tokens)
    h = auth(tokens, user)
    pid = order["payment_id"]
    for method, path in (
        ("POST", f"/api/v1/payment/sandbox/{pid}/approve"),
        ("POST", f"/api/v1/payment/sandbox/{pid}/fail"),
        ("GET", f"/api/v1/payment/sandbox/{pid}"),
    ):
        resp = await client.request(method, path, headers=h)
        assert resp.status == 404, (path, await resp.text())
    spec = await (await client.get("/api/v1/openapi.json")).json()
    assert not [p for p in spec["paths"] if "/sandbox/" in p]
    status = await db.fetchval("SELECT status FROM orders WHERE id = $1", order["order_id"])
    assert status == "pending_payment"

    body = {"order_id": order["order_id"], "payment_method": "wechat"}
    resp = await client.post("/api/v1/payment/create", json=body, headers=h)
    assert resp.status == 503 and (await resp.json())["error"] == "PAYMENT_PROVIDER_UNAVAILABLE"
    resp = await client.post(
        f"/api/v1/orders/{order['order_id']}/pay", json={"payment_method": "wechat"}, headers=h
    )
    assert resp.status == 503 and (await resp.json())["error"] == "PAYMENT_PROVIDER_UNAVAILABLE"
    methods = (await (await client.get("/api/v1/payment/methods")).json())["data"]
    assert methods and not any(m["available"] for m in methods)
    assert {m["provider"] for m in methods} == {"none"}

    ready = await (await client.get("/readyz")).json()
    assert ready["data"]["payment_provider"] == "none"

    # Without a provider, a signed notification is still verified and applied.
    app = client.app
    assert app is not None
    note = {
        "payment_id": pid,
        "order_id": order["order_id"],
        "status": "success",
        "amount": 10000,
        "transaction_id": "T-none",
    }
    resp = await client.post("/api/v1/payment/notify", json={**note, "sign": "0" * 64})
    assert resp.status == 400
    resp = await client.post("/api/v1/payment/notify", json=signed(app, note))
    assert resp.status == 200, await resp.text()


@pytest.mark.integration
async def test_sandbox_on_says_so(client: TestClient[Any, Any]) -> None:
    ready = await (await client.get("/readyz")).json()
    assert ready["data"]["payment_provider"] == "sandbox"
    spec = await (await client.get("/api/v1/openapi.json")).json()
    assert "/api/v1/payment/sandbox/{payment_id}/approve" in spec["paths"]


# --- finding 3: after shipping, money back goes through a return ---------------------


@pytest.mark.integration
async def test_shopper_cannot_refund_what_shipped(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, merchant, order = await _order(client, db, tokens, price=30000)
    oid, h = order["order_id"], auth(tokens, user)
    mh = auth(tokens, merchant, "merchant")
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    body = {"order_id": oid, "refund_amount": 30000, "reason": "changed my mind"}
    resp = await client.post(
        f"/api/v1/orders/{oid}/ship",
        headers=mh,
        json={"shipping_company": "SF", "tracking_number": "SF1"},
    )
    assert resp.status == 200, await resp.text()
    for step in ("shipped", "completed"):
        if step == "completed":
            resp = await client.post(f"/api/v1/orders/{oid}/confirm", headers=h)
            assert resp.status == 200
        resp = await client.post("/api/v1/payment/refund", json=body, headers=h)
        assert resp.status == 409, (step, await resp.text())
        assert (await resp.json())["error"] == "RETURN_REQUIRED"
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "completed", "refunded_cents": 0}
    # The merchant alone cannot refund either; an admin can, all that is left (a part goes
    # back through a return, priced by its lines).
    resp = await client.post("/api/v1/payment/refund", json=body, headers=mh)
    assert resp.status in (403, 404)
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    resp = await client.post(
        "/api/v1/payment/refund", json={**body, "refund_amount": 20000}, headers=admin
    )
    assert resp.status == 409 and (await resp.json())["error"] == "FULL_REFUND_REQUIRED"
    resp = await client.post("/api/v1/payment/refund", json=body, headers=admin)
    assert resp.status == 200 and (await resp.json())["data"]["order_status"] == "refunded"


@pytest.mark.integration
async def test_concurrent_refunds_never_exceed_what_was_paid(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, _, order = await _order(client, db, tokens, price=30000)
    oid, h = order["order_id"], auth(tokens, user)
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    body = {"order_id": oid, "reason": "twice over"}
    responses = await asyncio.gather(
        *(client.post("/api/v1/payment/refund", json=body, headers=h) for _ in range(8))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [409] * 7
    # the losers find the order cancelled
    losers = {(await r.json())["error"] for r in responses if r.status == 409}
    assert losers == {"INVALID_TRANSITION"}
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "cancelled", "refunded_cents": 30000}
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", oid) == 1


# --- finding 5: one lock order for cancel and payment ---------------------------------


@pytest.mark.integration
async def test_concurrent_cancel_and_payment_never_500(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    pairs = 16
    merchant = await make_user(db, "merchant")
    _, (sku,) = await make_product(db, merchant, [(1000, pairs)])
    placed = []
    for _ in range(pairs):
        user = await make_user(db)
        status, data = await place_order(client, tokens, user, sku)
        assert status == 201, data
        placed.append((user, data["data"]))

    async def pay(i: int, user: int, order: dict[str, Any]) -> int:
        if i % 2:
            resp = await client.post(
                f"/api/v1/payment/sandbox/{order['payment_id']}/approve",
                headers=auth(tokens, user),
            )
        else:
            note = {
                "payment_id": order["payment_id"],
                "order_id": order["order_id"],
                "status": "success",
                "amount": order["final_amount"],
                "transaction_id": f"T-race-{i}",
            }
            resp = await client.post("/api/v1/payment/notify", json=signed(app, note))
        return resp.status

    async def cancel(user: int, order: dict[str, Any]) -> int:
        resp = await client.post(
            f"/api/v1/orders/{order['order_id']}/cancel", json={}, headers=auth(tokens, user)
        )
        return resp.status

    results = await asyncio.gather(
        *(
            asyncio.gather(cancel(user, order), pay(i, user, order))
            for i, (user, order) in enumerate(placed)
        )
    )
    paid = 0
    for (cancel_status, pay_status), (_, order) in zip(results, placed, strict=True):
        assert {cancel_status, pay_status} <= {200, 409}, (cancel_status, pay_status)
        status = await db.fetchval("SELECT status FROM orders WHERE id = $1", order["order_id"])
        pays = await db.fetch(
            "SELECT status FROM pay_orders WHERE order_id = $1", order["order_id"]
        )
        if status == "paid":
            paid += 1
            assert (cancel_status, pay_status) == (409, 200)
            assert [p["status"] for p in pays] == ["success"]
        else:  # cancelled first: the payment, verified late, went back (see below)
            assert status == "cancelled" and cancel_status == 200
            assert [p["status"] for p in pays] == ["refunded"]
    assert await sku_row(db, sku) == {"on_hand": pairs - paid, "reserved": 0, "sold": paid}


# --- finding 12: the notify key is not a function anyone can undo ----------------------


@pytest.mark.unit
def test_notify_key_is_derived_with_a_label() -> None:
    s = Settings.from_env({}).with_(secret_key=TEST_SECRET)
    key = s.payment_hmac_key
    assert TEST_SECRET.encode() not in key
    assert key != ("sandbox:" + TEST_SECRET).encode()
    assert len(key) == 32 and key == s.payment_hmac_key
    other = s.with_(secret_key=TEST_SECRET[::-1]).payment_hmac_key
    assert other != key
    own = s.with_(payment_secret="provider-shared-secret-0123456789")
    assert own.payment_hmac_key == b"provider-shared-secret-0123456789"


# --- finding 16: an unsigned notification writes nothing and forges no log line ---------

SQL_ORDER_ROW = "SELECT * FROM orders WHERE id = $1"
SQL_PAYMENT_ROWS = "SELECT * FROM pay_orders WHERE order_id = $1 ORDER BY id"
SQL_ORDER_LOGS = "SELECT count(*) FROM order_logs WHERE order_id = $1"


async def _money_rows(db: asyncpg.Pool, order_id: str) -> dict[str, Any]:
    """The order's row, its payment rows and how many log lines it has, as stored."""
    order = await db.fetchrow(SQL_ORDER_ROW, order_id)
    assert order is not None
    return {
        "order": dict(order),
        "payments": [dict(r) for r in await db.fetch(SQL_PAYMENT_ROWS, order_id)],
        "logs": await db.fetchval(SQL_ORDER_LOGS, order_id),
    }


@pytest.mark.integration
async def test_unsigned_notify_writes_nothing_and_logs_escaped(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, order = await _order(client, db, tokens)
    before = await db.fetchval("SELECT count(*) FROM payment_notifications")
    rows = await _money_rows(db, order["order_id"])
    assert rows["order"]["status"] == "pending_payment"
    assert [p["status"] for p in rows["payments"]] == ["pending"]
    forged = "PAYX\n2026-01-01 00:00:00 INFO gateway: admin logged in"
    with caplog.at_level(logging.INFO):
        for payment_id in (forged, order["payment_id"]):
            note = {
                "payment_id": payment_id,
                "order_id": order["order_id"],
                "status": "success",
                "amount": 10000,
                "sign": "0" * 64,
            }
            resp = await client.post("/api/v1/payment/notify", json=note)
            assert resp.status == 400 and (await resp.json())["error"] == "BAD_SIGNATURE"
    assert await db.fetchval("SELECT count(*) FROM payment_notifications") == before
    assert await _money_rows(db, order["order_id"]) == rows  # not a field of either changed
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected
    assert all("\n" not in r.getMessage() for r in rejected)


# --- finding 17: the signature covers every field sent -------------------------------


@pytest.mark.integration
async def test_signature_covers_provider_extra_fields(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, _, order = await _order(client, db, tokens)
    note = signed(
        app,
        {
            "payment_id": order["payment_id"],
            "order_id": order["order_id"],
            "status": "success",
            "amount": 10000,
            "transaction_id": "T-extra",
            "currency": "CNY",
            "buyer": {"id": "2088", "masked": "z***@x.cn"},
            "coupon": None,
        },
    )
    rows = await _money_rows(db, order["order_id"])
    for tampered in ({"currency": "USD"}, {"coupon": "FREE"}, {"added": 1}):
        resp = await client.post("/api/v1/payment/notify", json={**note, **tampered})
        assert resp.status == 400, tampered
        assert await _money_rows(db, order["order_id"]) == rows, tampered
    resp = await client.post("/api/v1/payment/notify", json=note)
    assert resp.status == 200, await resp.text()
    paid = await _money_rows(db, order["order_id"])
    assert paid["order"]["status"] == "paid"
    assert [
        (p["id"], p["status"], p["amount_cents"], p["transaction_id"]) for p in paid["payments"]
    ] == [(order["payment_id"], "success", 10000, "T-extra")]
    body = await db.fetchval(
        "SELECT body FROM payment_notifications WHERE payment_id = $1 AND accepted",
        order["payment_id"],
    )
    assert body["currency"] == "CNY"


@pytest.mark.unit
def test_canonical_form_is_sorted_compact_json_without_sign() -> None:
    import json

    fields = {"b": 1, "a": "é&x=1", "sign": "zz", "n": None, "o": {"y": 2, "x": [1, "2"]}}
    expected = json.dumps(
        {k: v for k, v in fields.items() if k != "sign"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert payments.canonical(fields) == expected
    # An "&" inside a value cannot pass for a field boundary.
    assert payments.canonical({"a": "1&b=2"}) != payments.canonical({"a": "1", "b": "2"})


# --- issue 20, finding 1: goods for one cent -------------------------------------------


async def _merchant_sees(
    client: TestClient[Any, Any], mh: dict[str, str], oid: str
) -> tuple[dict[str, Any], dict[str, str]]:
    listed = await (
        await client.get("/api/v1/merchant/orders", headers=mh, params={"order_id": oid})
    ).json()
    (row,) = listed["data"]["orders"]
    export = await client.get("/api/v1/merchant/orders/export", headers=mh)
    (line,) = [r for r in csv.DictReader(io.StringIO(await export.text())) if r["order_id"] == oid]
    return row, line


async def _ship_both_ways(
    client: TestClient[Any, Any], mh: dict[str, str], oid: str
) -> tuple[int, str | None, dict[str, Any]]:
    ship = {"shipping_company": "SF", "tracking_number": "SF1"}
    single = await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship)
    bulk = await client.post(
        "/api/v1/merchant/orders/ship",
        headers=mh,
        json={"shipments": [{"order_id": oid, **ship}]},
    )
    assert bulk.status == 200
    (result,) = (await bulk.json())["data"]["results"]
    return single.status, (await single.json()).get("error"), result


@pytest.mark.integration
async def test_a_refund_before_shipping_cancels_the_order_in_full(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, merchant, order = await _order(client, db, tokens, price=19_900)
    oid, h, mh = order["order_id"], auth(tokens, user), auth(tokens, merchant, "merchant")
    sku = await db.fetchval("SELECT sku_id FROM order_items WHERE order_id = $1", oid)
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    assert await sku_row(db, sku) == {"on_hand": 9, "reserved": 0, "sold": 1}

    # the attack: keep one cent paid, get the goods
    body = {"order_id": oid, "refund_amount": 19_899, "reason": "changed my mind"}
    resp = await client.post("/api/v1/payment/refund", json=body, headers=h)
    assert resp.status == 409, await resp.text()
    refused = await resp.json()
    assert refused["error"] == "FULL_REFUND_REQUIRED"
    assert refused["data"]["refundable"] == 19_900
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "paid", "refunded_cents": 0}
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", oid) == 0

    # money back before shipping: all of it, and the order is cancelled with its stock back
    resp = await client.post(
        "/api/v1/payment/refund", json={"order_id": oid, "reason": "changed my mind"}, headers=h
    )
    assert resp.status == 200, await resp.text()
    done = (await resp.json())["data"]
    assert done["refund_amount"] == 19_900 and done["order_status"] == "cancelled"
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "cancelled", "refunded_cents": 19_900}
    assert await sku_row(db, sku) == {"on_hand": 10, "reserved": 0, "sold": 0}
    logs = await db.fetch("SELECT to_status FROM order_logs WHERE order_id = $1 ORDER BY id", oid)
    assert [r["to_status"] for r in logs] == ["pending_payment", "paid", "cancelled"]

    # nothing ships, nothing completes; the merchant sees what went back
    status, error, result = await _ship_both_ways(client, mh, oid)
    assert (status, error) == (409, "INVALID_TRANSITION") and result["ok"] is False
    resp = await client.post(f"/api/v1/orders/{oid}/confirm", headers=h)
    assert resp.status == 409
    row_seen, line = await _merchant_sees(client, mh, oid)
    assert row_seen["refunded_amount"] == 19_900 and line["refunded_cents"] == "19900"
    assert await db.fetchval("SELECT status FROM orders WHERE id = $1", oid) == "cancelled"


@pytest.mark.integration
async def test_an_order_refunded_below_its_price_never_ships(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    """An order left paid with part of its money back (as the old partial refund left it,
    or any writer that slips) is refused by every way goods leave or an order completes."""
    user, merchant, order = await _order(client, db, tokens, price=19_900)
    oid, h, mh = order["order_id"], auth(tokens, user), auth(tokens, merchant, "merchant")
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    pay = await db.fetchval("SELECT id FROM pay_orders WHERE order_id = $1", oid)
    await db.execute(
        "INSERT INTO refunds (id, order_id, pay_order_id, amount_cents, reason, status, "
        "requested_by) VALUES ('REFLEGACY' || $1, $1, $2, 19899, 'old partial', 'completed', $3)",
        oid,
        pay,
        user,
    )
    await db.execute("UPDATE orders SET refunded_cents = 19899 WHERE id = $1", oid)

    status, error, result = await _ship_both_ways(client, mh, oid)
    assert (status, error) == (409, "ORDER_NOT_PAID_IN_FULL")
    assert result["ok"] is False and result["error"] == "ORDER_NOT_PAID_IN_FULL"
    row_seen, line = await _merchant_sees(client, mh, oid)
    assert row_seen["refunded_amount"] == 19_899 and line["refunded_cents"] == "19899"

    # shipped anyway (by a path that skipped the check): the buyer cannot complete it
    await db.execute("UPDATE orders SET status = 'shipped', shipped_at = now() WHERE id = $1", oid)
    resp = await client.post(f"/api/v1/orders/{oid}/confirm", headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAID_IN_FULL"
    resp = await client.post(f"/api/v1/orders/{oid}/deliver", headers=mh)
    assert resp.status == 409 and (await resp.json())["error"] == "ORDER_NOT_PAID_IN_FULL"
    assert await db.fetchval("SELECT status FROM orders WHERE id = $1", oid) == "shipped"
    # the broken state was written by hand; put it right, or reconcile's money checks, run by
    # other tests over this shared database, would rightly report it
    await db.execute("DELETE FROM refunds WHERE id = 'REFLEGACY' || $1", oid)
    await db.execute("UPDATE orders SET refunded_cents = 0 WHERE id = $1", oid)


# --- issue 20, finding 8: a verified payment for a cancelled order goes back ------------


def _auto_refunds(state: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "flashsale_payments_auto_refunded_total", {"order_status": state}
    )
    return value or 0.0


@pytest.mark.integration
async def test_a_payment_that_finds_its_order_cancelled_is_refunded_once(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    rounds = 12
    merchant = await make_user(db, "merchant")
    _, (sku,) = await make_product(db, merchant, [(1000, rounds)])
    before = _auto_refunds("cancelled")
    notes: list[dict[str, Any]] = []
    for i in range(rounds):  # the race each round: cancel and the approval together
        user = await make_user(db)
        status, data = await place_order(client, tokens, user, sku)
        assert status == 201, data
        order, h = data["data"], auth(tokens, user)
        note = signed(
            app,
            {
                "payment_id": order["payment_id"],
                "order_id": order["order_id"],
                "status": "success",
                "amount": order["final_amount"],
                "transaction_id": f"T-late-{i}",
            },
        )
        notes.append(note)
        cancel, pay = await asyncio.gather(
            client.post(f"/api/v1/orders/{order['order_id']}/cancel", json={}, headers=h),
            client.post("/api/v1/payment/notify", json=note),
        )
        assert pay.status == 200, await pay.text()
        assert cancel.status in (200, 409), await cancel.text()
    # an order that got cancelled first sees the approval too, after the fact
    user = await make_user(db)
    status, data = await place_order(client, tokens, user, sku)
    assert status == 201, data
    late, h = data["data"], auth(tokens, user)
    resp = await client.post(f"/api/v1/orders/{late['order_id']}/cancel", json={}, headers=h)
    assert resp.status == 200
    resp = await client.post(f"/api/v1/payment/sandbox/{late['payment_id']}/approve", headers=h)
    assert resp.status == 409, await resp.text()
    refused = await resp.json()
    assert refused["error"] == "ORDER_NOT_PAYABLE"
    assert refused["data"]["refund_amount"] == late["final_amount"]
    assert refused["data"]["order_status"] == "cancelled"
    # the provider retries every notification: nothing more goes back
    for note in notes:
        resp = await client.post("/api/v1/payment/notify", json=note)
        assert resp.status == 200 and (await resp.json())["data"]["duplicate"] is True

    ids = [n["order_id"] for n in notes] + [late["order_id"]]
    rows = await db.fetch(
        """
        SELECT o.id, o.status, p.id AS pay_id, p.status AS pay_status,
               (SELECT count(*) FROM refunds f WHERE f.pay_order_id = p.id) AS refunds,
               (SELECT coalesce(sum(f.amount_cents), 0) FROM refunds f
                WHERE f.pay_order_id = p.id) AS refunded,
               (SELECT count(*) FROM order_logs l
                WHERE l.order_id = o.id AND l.to_status = 'payment_refunded') AS logged,
               o.refunded_cents
        FROM orders o JOIN pay_orders p ON p.order_id = o.id
        WHERE o.id = ANY($1::text[])
        """,
        ids,
    )
    assert len(rows) == rounds + 1
    cancelled = [r for r in rows if r["status"] == "cancelled"]
    assert cancelled, "no round had the cancel win: the race was not run"
    for r in rows:
        if r["status"] == "cancelled":
            assert (r["pay_status"], r["refunds"], r["refunded"], r["logged"]) == (
                "refunded",
                1,
                notes[0]["amount"],
                1,
            ), dict(r)
            assert r["refunded_cents"] == notes[0]["amount"]
        else:
            assert (r["status"], r["pay_status"], r["refunds"]) == ("paid", "success", 0)
    assert _auto_refunds("cancelled") - before == len(cancelled)
    paid = rounds + 1 - len(cancelled)
    assert await sku_row(db, sku) == {"on_hand": rounds - paid, "reserved": 0, "sold": paid}


@pytest.mark.integration
async def test_a_second_payment_of_a_shipped_order_is_refunded_and_the_order_completes(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    user, merchant, order = await _order(client, db, tokens, price=19_900)
    oid, mh = order["order_id"], auth(tokens, merchant, "merchant")
    await pay_via_sandbox(client, tokens, user, order["payment_id"])
    ship = {"shipping_company": "SF", "tracking_number": "SF3"}
    resp = await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship)
    assert resp.status == 200, await resp.text()
    amount = await db.fetchval("SELECT pay_cents FROM orders WHERE id = $1", oid)
    twice = "PAY2ND" + order["payment_id"][6:]
    await db.execute(  # an attempt that was closed, then approved at the provider anyway
        "INSERT INTO pay_orders (id, order_id, user_id, amount_cents, method, status, "
        "expires_at) VALUES ($1, $2, $3, $4, 'wechat', 'closed', now())",
        twice,
        oid,
        user,
        amount,
    )
    before = _auto_refunds("shipped")
    note = {"payment_id": twice, "order_id": oid, "status": "success", "amount": amount}
    resp = await client.post("/api/v1/payment/notify", json=signed(app, note))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["payment_status"] == "refunded"
    assert _auto_refunds("shipped") - before == 1
    # the order's own payment stands: nothing of its price went back
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "shipped", "refunded_cents": 0}
    refunds = await db.fetch(
        "SELECT pay_order_id, amount_cents FROM refunds WHERE order_id = $1", oid
    )
    assert [tuple(r) for r in refunds] == [(twice, amount)]
    resp = await client.post(f"/api/v1/orders/{oid}/confirm", headers=auth(tokens, user))
    assert resp.status == 200, await resp.text()
