from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale import coupons, orders
from flashsale.auth import TokenService
from flashsale.coupons import PricedLine
from flashsale.errors import (
    CouponLimitReached,
    CouponNotApplicable,
    CouponSoldOut,
)
from tests.conftest import auth, make_user
from tests.store_helpers import (
    connection,
    make_category,
    make_listed_product,
    pay_via_sandbox,
    place_order,
)
from tests.store_helpers import make_product as store_product

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
HOUR = timedelta(hours=1)


def _code() -> str:
    return "C" + secrets.token_hex(5).upper()


async def make_coupon(db: asyncpg.Pool, **kw: Any) -> str:
    """A coupon row; by default amount_off 500 with no minimum, valid for an hour either side."""
    now = datetime.now(UTC)
    row: dict[str, Any] = {
        "code": _code(),
        "name": "test coupon",
        "type": "amount_off",
        "amount_off_cents": 500,
        "percent_off": None,
        "max_discount_cents": None,
        "min_amount_cents": 0,
        "scope": "all",
        "category_ids": [],
        "product_ids": [],
        "starts_at": now - HOUR,
        "ends_at": now + HOUR,
        "max_uses_per_user": 1,
        "total_quantity": None,
    } | kw
    cols = list(row)
    await db.execute(
        f"INSERT INTO coupons ({', '.join(cols)}) VALUES "
        f"({', '.join(f'${i + 1}' for i in range(len(cols)))})",
        *row.values(),
    )
    return str(row["code"])


async def use(client: Client, h: dict[str, str], **body: Any) -> Any:
    resp = await client.post("/api/v1/coupons/use", json=body, headers=h)
    payload = await resp.json()
    assert resp.status == 200, payload
    return payload["data"]


def _line(amount: int, *, product_id: int = 1, category_id: int | None = None) -> PricedLine:
    return PricedLine(product_id, 1, category_id, 1, amount)


async def test_admin_creates_coupons(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    now = datetime.now(UTC)
    body = {
        "code": _code(),
        "name": "满300减50",
        "type": "amount_off",
        "amount_off": 5_000,
        "min_amount": 30_000,
        "valid_from": (now - HOUR).isoformat(),
        "valid_until": (now + HOUR).isoformat(),
        "max_uses_per_user": 2,
    }
    resp = await client.post("/api/v1/admin/coupons", json=body, headers=admin)
    data = (await resp.json())["data"]
    assert resp.status == 201, data
    assert data["condition"] == {"min_amount": 30_000} and data["discount"] == {"amount": 5_000}
    assert data["code"] == body["code"] and data["remaining_uses"] == 2
    resp = await client.post("/api/v1/admin/coupons", json=body, headers=admin)
    assert resp.status == 409 and (await resp.json())["error"] == "COUPON_EXISTS"
    user = auth(tokens, await make_user(db))
    resp = await client.post("/api/v1/admin/coupons", json=body | {"code": _code()}, headers=user)
    assert resp.status == 403
    bad = body | {
        "code": _code(),
        "type": "percent_off",
        "scope": "categories",
        "valid_until": (now - 2 * HOUR).isoformat(),
    }
    resp = await client.post("/api/v1/admin/coupons", json=bad, headers=admin)
    assert resp.status == 422 and set((await resp.json())["fields"]) == {"valid_until"}
    bad["valid_until"] = (now + HOUR).isoformat()
    resp = await client.post("/api/v1/admin/coupons", json=bad, headers=admin)
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"percent_off", "category_ids"}


async def test_min_amount_boundary(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    h = auth(tokens, await make_user(db))
    code = await make_coupon(db, min_amount_cents=30_000, amount_off_cents=5_000)
    met = await use(client, h, coupon_code=code, order_amount=30_000)
    assert met == {
        "applicable": True,
        "discount_amount": 5_000,
        "free_shipping": False,
        "final_amount": 25_000,
        "coupon_used_id": None,
        "reason": None,
    }
    short = await use(client, h, coupon_code=code, order_amount=29_999)
    assert short["applicable"] is False and short["discount_amount"] == 0
    assert short["final_amount"] == 29_999
    # evaluating consumes nothing
    met_again = await use(client, h, coupon_code=code, order_amount=30_000)
    assert met_again["applicable"] is True
    resp = await client.post(
        "/api/v1/coupons/use", headers=h, json={"coupon_code": "NOPE" + _code(), "order_amount": 1}
    )
    assert resp.status == 404 and (await resp.json())["error"] == "COUPON_NOT_FOUND"
    resp = await client.post("/api/v1/coupons/use", headers=h, json={"order_amount": -1})
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"coupon_code", "order_amount"}


async def test_percent_off_with_cap(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    h = auth(tokens, await make_user(db))
    code = await make_coupon(
        db, type="percent_off", amount_off_cents=None, percent_off=20, max_discount_cents=1_000
    )
    assert (await use(client, h, coupon_code=code, order_amount=3_999))["discount_amount"] == 799
    assert (await use(client, h, coupon_code=code, order_amount=9_000))["discount_amount"] == 1_000


async def test_window_boundaries(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    h = auth(tokens, await make_user(db))
    now = datetime.now(UTC)
    future = await make_coupon(db, starts_at=now + HOUR, ends_at=now + 2 * HOUR)
    past = await make_coupon(db, starts_at=now - 2 * HOUR, ends_at=now - timedelta(seconds=1))
    assert (await use(client, h, coupon_code=future, order_amount=1_000))["applicable"] is False
    assert (await use(client, h, coupon_code=past, order_amount=1_000))["applicable"] is False
    listed = {
        c["code"]
        for c in (await (await client.get("/api/v1/coupons/available", headers=h)).json())["data"]
    }
    assert future not in listed and past not in listed
    # the window is [starts_at, ends_at): exactly at the start applies, exactly at the end not
    row = {
        "starts_at": now,
        "ends_at": now + HOUR,
        "total_quantity": None,
        "used_count": 0,
        "max_uses_per_user": 1,
        "min_amount_cents": 0,
        "type": "amount_off",
        "amount_off_cents": 100,
        "percent_off": None,
        "max_discount_cents": None,
    }
    assert coupons.assess(row, eligible_cents=500, now=now, user_used=0).applicable
    assert not coupons.assess(
        row, eligible_cents=500, now=now - timedelta(microseconds=1), user_used=0
    ).applicable
    assert not coupons.assess(row, eligible_cents=500, now=now + HOUR, user_used=0).applicable
    assert coupons.assess(
        row, eligible_cents=500, now=now + HOUR - timedelta(microseconds=1), user_used=0
    ).applicable


async def test_scope_by_category_and_product(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    parent = await make_category(db)
    child = await make_category(db, parent)
    other = await make_category(db)
    child_name = await db.fetchval("SELECT name FROM categories WHERE id = $1", child)
    cat_code = await make_coupon(db, scope="categories", category_ids=[parent])
    for cats in ([child], [child_name], [parent]):
        verdict = await use(
            client, h, coupon_code=cat_code, order_amount=2_000, product_categories=cats
        )
        assert verdict["applicable"] is True, cats
    verdict = await use(
        client, h, coupon_code=cat_code, order_amount=2_000, product_categories=[other]
    )
    assert verdict["applicable"] is False
    pid, _ = await make_listed_product(db)
    prod_code = await make_coupon(db, scope="products", product_ids=[pid])
    assert (await use(client, h, coupon_code=prod_code, order_amount=2_000, product_ids=[pid]))[
        "applicable"
    ] is True
    assert (await use(client, h, coupon_code=prod_code, order_amount=2_000, product_ids=[pid + 1]))[
        "applicable"
    ] is False
    # in a quote only the in-scope lines count towards min_amount and the discount
    uid = await make_user(db)
    pct = await make_coupon(
        db,
        type="percent_off",
        amount_off_cents=None,
        percent_off=10,
        scope="categories",
        category_ids=[parent],
        min_amount_cents=1_000,
    )
    lines = [_line(1_000, category_id=child), _line(50_000, category_id=other)]
    async with connection(db) as conn:
        q = await coupons.quote(conn, user_id=uid, lines=lines, coupon_code=pct)
        assert q.discount_cents == 100 and q.subtotal_cents == 51_000 and q.shipping_cents == 0
        with pytest.raises(CouponNotApplicable):
            await coupons.quote(
                conn, user_id=uid, lines=[_line(999, category_id=child)], coupon_code=pct
            )


async def test_per_user_limit_under_concurrent_redeem(db: asyncpg.Pool) -> None:
    uid = await make_user(db)
    code = await make_coupon(db, max_uses_per_user=3)
    lines = [_line(2_000)]

    async def attempt(i: int) -> int | None:
        async with connection(db) as conn:
            try:
                applied = await coupons.redeem(
                    conn, user_id=uid, code=code, lines=lines, order_id=f"o-{code}-{i}"
                )
            except CouponLimitReached:
                return None
            return applied.coupon_use_id

    results = await asyncio.gather(*(attempt(i) for i in range(10)))
    used = [r for r in results if r is not None]
    assert len(used) == 3
    count = (
        "SELECT count(*) FROM coupon_uses WHERE coupon_id = (SELECT id FROM coupons "
        "WHERE code = $1) AND status = $2"
    )
    assert await db.fetchval(count, code, "used") == 3
    async with connection(db) as conn:
        await coupons.unredeem(conn, used[0])
        await coupons.unredeem(conn, used[0])
        assert await db.fetchval(count, code, "used") == 2
        assert await db.fetchval(count, code, "released") == 1
        again = await coupons.redeem(
            conn, user_id=uid, code=code, lines=lines, order_id=f"o-{code}-again"
        )
        assert again.discount_cents == 500 and again.code == code
        with pytest.raises(CouponLimitReached):
            await coupons.redeem(
                conn, user_id=uid, code=code, lines=lines, order_id=f"o-{code}-over"
            )
    # another user has their own allowance
    async with connection(db) as conn:
        other = await coupons.redeem(
            conn, user_id=await make_user(db), code=code, lines=lines, order_id=f"o-{code}-other"
        )
    assert other.coupon_use_id is not None


async def test_total_quantity_under_concurrency(db: asyncpg.Pool) -> None:
    code = await make_coupon(db, total_quantity=2)
    users = [await make_user(db) for _ in range(6)]

    async def attempt(uid: int) -> bool:
        async with connection(db) as conn:
            try:
                await coupons.redeem(
                    conn, user_id=uid, code=code, lines=[_line(1_000)], order_id=f"o-{code}-{uid}"
                )
            except CouponSoldOut:
                return False
            return True

    assert sum(await asyncio.gather(*(attempt(u) for u in users))) == 2
    assert await db.fetchval("SELECT used_count FROM coupons WHERE code = $1", code) == 2


async def test_redeem_rejects_inapplicable_and_no_code(db: asyncpg.Pool) -> None:
    uid = await make_user(db)
    code = await make_coupon(db, min_amount_cents=5_000)
    async with connection(db) as conn:
        with pytest.raises(CouponNotApplicable):
            await coupons.redeem(
                conn, user_id=uid, code=code, lines=[_line(4_999)], order_id="o-" + code
            )
        none = await coupons.redeem(
            conn, user_id=uid, code=None, lines=[_line(1)], order_id="o-none-" + code
        )
    assert none == coupons.CouponApplication(None, None, 0, False)


async def test_quote_never_below_zero_and_free_shipping(db: asyncpg.Pool) -> None:
    uid = await make_user(db)
    big = await make_coupon(db, amount_off_cents=100_000)
    ship = await make_coupon(db, type="free_shipping", amount_off_cents=None)
    async with connection(db) as conn:
        q = await coupons.quote(conn, user_id=uid, lines=[_line(800)], coupon_code=big)
        assert q.discount_cents == 800 and q.shipping_cents == coupons.SHIPPING_FEE_CENTS
        assert q.total_cents == coupons.SHIPPING_FEE_CENTS and q.coupon_code == big
        q = await coupons.quote(conn, user_id=uid, lines=[_line(800)], coupon_code=ship)
        assert q.shipping_cents == 0 and q.discount_cents == 0 and q.total_cents == 800
        q = await coupons.quote(
            conn, user_id=uid, coupon_code=None, lines=[_line(coupons.FREE_SHIPPING_MIN_CENTS)]
        )
        assert q.shipping_cents == 0
        q = await coupons.quote(
            conn, user_id=uid, coupon_code=None, lines=[_line(coupons.FREE_SHIPPING_MIN_CENTS - 1)]
        )
        assert q.shipping_cents == coupons.SHIPPING_FEE_CENTS


async def test_available_with_amount(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    h = auth(tokens, uid)
    code = await make_coupon(db, min_amount_cents=10_000)
    used_up = await make_coupon(db)
    async with connection(db) as conn:
        await coupons.redeem(
            conn, user_id=uid, code=used_up, lines=[_line(1_000)], order_id="o-" + used_up
        )
    resp = await client.get("/api/v1/coupons/available?amount=9999", headers=h)
    listed = {c["code"]: c for c in (await resp.json())["data"]}
    assert used_up not in listed
    assert listed[code]["applicable"] is False and listed[code]["condition"]["min_amount"] == 10_000
    resp = await client.get("/api/v1/coupons/available?amount=10000", headers=h)
    listed = {c["code"]: c for c in (await resp.json())["data"]}
    assert listed[code]["applicable"] is True and listed[code]["discount_amount"] == 500
    resp = await client.get("/api/v1/coupons/available?amount=abc", headers=h)
    assert resp.status == 422
    resp = await client.get("/api/v1/coupons/available")
    assert resp.status == 401


async def _coupon_state(db: asyncpg.Pool, code: str) -> tuple[int, int, list[str]]:
    row = await db.fetchrow(
        "SELECT c.used_count, coalesce(sum(u.used), 0) AS user_used FROM coupons c "
        "LEFT JOIN coupon_user_counts u ON u.coupon_id = c.id WHERE c.code = $1 "
        "GROUP BY c.used_count",
        code,
    )
    assert row is not None
    uses = await db.fetch(
        "SELECT cu.status FROM coupon_uses cu JOIN coupons c ON c.id = cu.coupon_id "
        "WHERE c.code = $1 ORDER BY cu.id",
        code,
    )
    return row["used_count"], row["user_used"], [u["status"] for u in uses]


async def test_cancel_and_timeout_give_the_coupon_back_once(
    client: Client, app: web.Application, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await store_product(db, merchant, [(2000, 10)])
    code = await make_coupon(db, total_quantity=1, max_uses_per_user=1)
    h = auth(tokens, user)

    status, data = await place_order(client, tokens, user, sku, coupon_code=code)
    assert status == 201 and data["data"]["discount_amount"] == 500
    assert await _coupon_state(db, code) == (1, 1, ["used"])
    oid = data["data"]["order_id"]
    cancels = await asyncio.gather(
        *(client.post(f"/api/v1/orders/{oid}/cancel", headers=h) for _ in range(3))
    )
    assert sorted(r.status for r in cancels) == [200, 409, 409]
    assert await _coupon_state(db, code) == (0, 0, ["released"])

    # The same (single-use, single-copy) coupon works again; this time the order times out.
    status, data = await place_order(client, tokens, user, sku, coupon_code=code)
    assert status == 201, data
    oid = data["data"]["order_id"]
    await db.execute(
        "UPDATE orders SET payment_deadline = now() - interval '1 s' WHERE id = $1", oid
    )
    await asyncio.gather(orders.close_expired_orders(db), orders.close_expired_orders(db))
    for _ in range(50):  # a consumer's store sweeper may have taken it
        if await db.fetchval("SELECT status FROM orders WHERE id = $1", oid) == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert await _coupon_state(db, code) == (0, 0, ["released", "released"])
    status, _ = await place_order(client, tokens, user, sku, coupon_code=code)
    assert status == 201
    assert await _coupon_state(db, code) == (1, 1, ["released", "released", "used"])


async def test_a_refund_before_shipping_gives_the_coupon_back_once(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user = await make_user(db, "merchant"), await make_user(db)
    _, (sku,) = await store_product(db, merchant, [(2000, 10)])
    code = await make_coupon(db, total_quantity=1, max_uses_per_user=1)
    h = auth(tokens, user)
    status, data = await place_order(client, tokens, user, sku, coupon_code=code)
    assert status == 201 and data["data"]["discount_amount"] == 500
    oid, paid = data["data"]["order_id"], data["data"]["final_amount"]
    await pay_via_sandbox(client, tokens, user, data["data"]["payment_id"])
    assert await _coupon_state(db, code) == (1, 1, ["used"])
    refunds = await asyncio.gather(
        *(
            client.post("/api/v1/payment/refund", headers=h, json={"order_id": oid, "reason": "r"})
            for _ in range(3)
        )
    )
    assert sorted(r.status for r in refunds) == [200, 409, 409]
    refunded = await db.fetchval("SELECT refunded_cents FROM orders WHERE id = $1", oid)
    assert refunded == paid  # what the buyer paid, after the discount
    assert await _coupon_state(db, code) == (0, 0, ["released"])
    status, _ = await place_order(client, tokens, user, sku, coupon_code=code)
    assert status == 201
