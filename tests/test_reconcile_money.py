"""``flashsale reconcile``, money side (issue 20 #10): each drift written straight into
PostgreSQL is reported by its check, counted by the gauge and the sale's dashboard figure,
and makes the command exit 1; money that adds up exits 0."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from consumers import reconcile
from consumers.reconcile_money import CHECKS, check_money
from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.db import create_pool, migrate
from tests.conftest import auth, make_user
from tests.store_helpers import make_product, pay_via_sandbox, place_order

pytestmark = pytest.mark.integration


@pytest.fixture
async def money_db(base_settings: Settings) -> AsyncIterator[tuple[Settings, asyncpg.Pool]]:
    """A database of its own: the session's holds every other test's orders."""
    name = "flashsale_money_" + secrets.token_hex(4)
    url = urlunsplit(urlsplit(base_settings.database)._replace(path="/" + name))
    admin = await asyncpg.connect(base_settings.database)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = await create_pool(url, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        yield base_settings.with_(database_url=url), pool
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class Shop:
    """Rows written as the service writes them, or broken on purpose."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self.n = 0

    async def setup(self) -> None:
        self.user = await make_user(self.db)
        merchant = await make_user(self.db, "merchant")
        self.product, (self.sku,) = await make_product(self.db, merchant, [(10_000, 100)])

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n:04d}{secrets.token_hex(3)}"

    async def order(
        self,
        status: str,
        *,
        units: int = 2,
        refunded: int = 0,
        sale: int | None = None,
    ) -> str:
        oid = self._id("O")
        total = units * 10_000
        await self.db.execute(
            "INSERT INTO orders (id, user_id, kind, status, total_cents, discount_cents, "
            "shipping_cents, pay_cents, refunded_cents, flash_sale_id) "
            "VALUES ($1, $2, $3, $4, $5, 0, 500, $6, $7, $8)",
            oid,
            self.user,
            "flash" if sale else "regular",
            status,
            total,
            total + 500,
            refunded,
            sale,
        )
        await self.db.execute(
            "INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents) "
            "VALUES ($1, $2, $3, $4, 10000)",
            oid,
            self.product,
            self.sku,
            units,
        )
        return oid

    async def pay(self, oid: str, amount: int | None = None, status: str = "success") -> str:
        pid = self._id("P")
        if amount is None:
            amount = await self.db.fetchval("SELECT pay_cents FROM orders WHERE id = $1", oid)
        await self.db.execute(
            "INSERT INTO pay_orders (id, order_id, user_id, amount_cents, method, status, "
            "expires_at) VALUES ($1, $2, $3, $4, 'alipay', $5, now())",
            pid,
            oid,
            self.user,
            amount,
            status,
        )
        return pid

    async def refund(self, oid: str, pid: str, amount: int) -> str:
        rid = self._id("R")
        await self.db.execute(
            "INSERT INTO refunds (id, order_id, pay_order_id, amount_cents, reason, status) "
            "VALUES ($1, $2, $3, $4, 'test', 'completed')",
            rid,
            oid,
            pid,
            amount,
        )
        return rid

    async def returned(
        self, oid: str, rid: str, *, units: int, asked: int, approved: int | None = None
    ) -> None:
        await self.db.execute(
            "INSERT INTO order_returns (id, order_id, user_id, kind, status, reason, "
            "amount_cents, items, refund_id, approved_cents) "
            "VALUES ($1, $2, $3, 'return', 'refunded', 'r', $4, $5, $6, $7)",
            self._id("T"),
            oid,
            self.user,
            asked,
            [{"sku_id": self.sku, "quantity": units}],
            rid,
            approved,
        )


async def _money_that_adds_up(shop: Shop) -> None:
    paid = await shop.order("paid")
    await shop.pay(paid)
    # shipped, one of two units returned for its share
    shipped = await shop.order("delivered", refunded=10_000)
    pid = await shop.pay(shipped)
    await shop.returned(shipped, await shop.refund(shipped, pid, 10_000), units=1, asked=10_000)
    # a return approved for more, explicitly
    generous = await shop.order("completed", refunded=15_000)
    pid = await shop.pay(generous)
    rid = await shop.refund(generous, pid, 15_000)
    await shop.returned(generous, rid, units=1, asked=10_000, approved=15_000)
    # cancelled, its late payment refunded; refunded before shipping (cancelled in full)
    late = await shop.order("cancelled", refunded=20_500)
    await shop.refund(late, await shop.pay(late, status="refunded"), 20_500)
    early = await shop.order("cancelled", refunded=20_500)
    await shop.refund(early, await shop.pay(early), 20_500)
    await shop.order("pending_payment")


def _gauge(check: str) -> float | None:
    return REGISTRY.get_sample_value("flashsale_reconcile_money_drift", {"check": check})


async def test_reconcile_reports_each_money_drift(
    money_db: tuple[Settings, asyncpg.Pool], redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, db = money_db
    shop = Shop(db)
    await shop.setup()
    await _money_that_adds_up(shop)
    report = await check_money(db)
    assert report.ok, report.findings
    assert await reconcile.run(settings, "reconcile", False) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("money")] == [
        f"money {check}: OK" for check in CHECKS
    ]
    assert all(_gauge(check) == 0 for check in CHECKS)

    sale: int = await db.fetchval(
        "INSERT INTO flash_sales (sku_id, product_id, flash_price_cents, quantity, "
        "per_user_limit, start_at, end_at, payment_window_s) "
        "VALUES ($1, $2, 10000, 10, 2, now(), now() + interval '1 hour', 900) RETURNING id",
        shop.sku,
        shop.product,
    )
    expected: dict[str, set[str]] = {check: set() for check in CHECKS}

    # paid (or further) without a verified payment of its amount
    no_pay = await shop.order("shipped", sale=sale)
    short_pay = await shop.order("paid")
    await shop.pay(short_pay, amount=1)
    failed_pay = await shop.order("completed")
    await shop.pay(failed_pay, status="failed")
    expected["paid_without_payment"] |= {no_pay, short_pay, failed_pay}

    # more refunded than paid: on a pay order, and on the order's figure
    over = await shop.order("refunded", refunded=20_500, sale=sale)
    pid = await shop.pay(over)
    await shop.refund(over, pid, 20_500)
    await shop.refund(over, pid, 1)
    over_figure = await shop.order("refunded", refunded=20_501)
    await shop.pay(over_figure)
    expected["refunds_exceed_paid"] |= {over, over_figure}

    # goods for one cent: shipped after 19,899 of 20,500 went back
    cent = await shop.order("shipped", refunded=20_499)
    await shop.refund(cent, await shop.pay(cent), 20_499)
    expected["shipped_below_price"].add(cent)

    # a verified payment of a cancelled order kept, or given back in part
    kept = await shop.order("cancelled", sale=sale)
    await shop.pay(kept)
    part = await shop.order("cancelled")
    await shop.refund(part, await shop.pay(part, status="refunded"), 100)
    expected["cancelled_payment_kept"] |= {kept, part}

    # a return of 1 of 2 units refunded as if both came back
    whole = await shop.order("completed", refunded=20_000)
    pid = await shop.pay(whole)
    await shop.returned(whole, await shop.refund(whole, pid, 20_000), units=1, asked=20_000)
    expected["return_refund_mismatch"].add(whole)

    report = await check_money(db, redis, [sale])
    assert {check: set(found) for check, found in report.findings.items()} == expected
    assert {check: _gauge(check) for check in CHECKS} == {
        check: len(ids) for check, ids in expected.items()
    }
    # the sale's figure: its orders' findings (no_pay, over, kept)
    assert await redis.get(rediskeys.dash_money_drift(sale)) == b"3"

    assert await reconcile.run(settings, "reconcile", False) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("money")]
    for check, ids in expected.items():
        (line,) = [x for x in lines if x.startswith(f"money {check}:")]
        assert f"DRIFT {len(ids)} order(s)" in line and all(i in line for i in ids), line
    assert lines[-1] == "money: DRIFT (see the checks above)"


async def test_the_services_own_money_flows_leave_nothing_to_report(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    """Pay, refund before shipping, a late payment on a cancelled order, a partial return
    and an explicit approval, through the API: none of them is a finding."""
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    sh, mh = auth(tokens, shopper), auth(tokens, merchant, "merchant")
    _, (sku,) = await make_product(db, merchant, [(19_900, 50)])
    made: list[str] = []

    async def order(quantity: int = 1) -> dict[str, Any]:
        status, body = await place_order(client, tokens, shopper, sku, quantity)
        assert status == 201, body
        data: dict[str, Any] = body["data"]
        made.append(data["order_id"])
        return data

    refunded = await order()
    await pay_via_sandbox(client, tokens, shopper, refunded["payment_id"])
    resp = await client.post(
        "/api/v1/payment/refund",
        json={"order_id": refunded["order_id"], "reason": "r"},
        headers=sh,
    )
    assert resp.status == 200
    late = await order()
    assert (
        await client.post(f"/api/v1/orders/{late['order_id']}/cancel", json={}, headers=sh)
    ).status == 200
    resp = await client.post(f"/api/v1/payment/sandbox/{late['payment_id']}/approve", headers=sh)
    assert resp.status == 409
    for explicit in (None, 30_000):
        shipped = await order(quantity=2)
        oid = shipped["order_id"]
        await pay_via_sandbox(client, tokens, shopper, shipped["payment_id"])
        ship = {"shipping_company": "SF", "tracking_number": "SF1"}
        assert (
            await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship)
        ).status == 200
        resp = await client.post(
            f"/api/v1/orders/{oid}/returns",
            headers=sh,
            json={"kind": "return", "reason": "r", "items": [{"sku_id": sku, "quantity": 1}]},
        )
        ret = (await resp.json())["data"]
        body = {} if explicit is None else {"refund_amount": explicit}
        resp = await client.post(
            f"/api/v1/returns/{ret['return_id']}/approve", headers=mh, json=body
        )
        assert resp.status == 200, await resp.text()
        assert (await client.post(f"/api/v1/orders/{oid}/confirm", headers=sh)).status == 200

    report = await check_money(db)
    found = {oid for ids in report.findings.values() for oid in ids}
    assert found.isdisjoint(made), {c: set(f) & set(made) for c, f in report.findings.items()}


async def test_an_admin_gives_back_what_reconcile_finds_kept(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    """A verified payment a cancelled order kept (written before late payments were refunded
    at once) is reported; an admin's refund gives it back, once, and the report clears."""
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    sh = auth(tokens, shopper)
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    _, (sku,) = await make_product(db, merchant, [(19_900, 5)])
    status, body = await place_order(client, tokens, shopper, sku)
    assert status == 201, body
    oid, amount = body["data"]["order_id"], body["data"]["final_amount"]
    resp = await client.post(f"/api/v1/orders/{oid}/cancel", json={}, headers=sh)
    assert resp.status == 200
    await db.execute(
        "UPDATE pay_orders SET status = 'success', paid_at = now() WHERE order_id = $1", oid
    )
    assert oid in (await check_money(db)).findings["cancelled_payment_kept"]

    refund = {"order_id": oid, "reason": "kept by a cancelled order"}
    resp = await client.post("/api/v1/payment/refund", json=refund, headers=sh)
    assert resp.status == 409  # the shopper cannot: an admin looks at it
    resp = await client.post(
        "/api/v1/payment/refund", json={**refund, "refund_amount": 1}, headers=admin
    )
    assert resp.status == 409 and (await resp.json())["error"] == "FULL_REFUND_REQUIRED"
    resp = await client.post("/api/v1/payment/refund", json=refund, headers=admin)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["refund_amount"] == amount
    resp = await client.post("/api/v1/payment/refund", json=refund, headers=admin)
    assert resp.status == 409 and (await resp.json())["error"] == "INVALID_TRANSITION"

    row = await db.fetchrow(
        "SELECT o.status, o.refunded_cents, p.status AS pay_status FROM orders o "
        "JOIN pay_orders p ON p.order_id = o.id WHERE o.id = $1",
        oid,
    )
    assert row is not None
    assert dict(row) == {"status": "cancelled", "refunded_cents": amount, "pay_status": "refunded"}
    assert await db.fetchval("SELECT sum(amount_cents) FROM refunds WHERE order_id = $1", oid) == (
        amount
    )
    report = await check_money(db)
    assert all(oid not in found for found in report.findings.values())
