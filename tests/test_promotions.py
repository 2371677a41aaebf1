from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from flashsale import coupons
from flashsale.auth import TokenService
from flashsale.coupons import PricedLine
from flashsale.promotions import (
    AppliedPromotion,
    CalcItem,
    Promotion,
    Tier,
    best_combination,
    best_tier,
)
from tests.conftest import auth, make_user
from tests.store_helpers import connection, make_category, make_listed_product

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
HOUR = timedelta(hours=1)
SEED_RULES = [
    {"min_amount": 20_000, "discount_amount": 3_000},
    {"min_amount": 50_000, "discount_amount": 10_000},
]


async def make_promotion(
    db: asyncpg.Pool,
    category_ids: list[int],
    rules: list[dict[str, int]] | None = None,
    *,
    starts: timedelta = -HOUR,
    ends: timedelta = HOUR,
) -> int:
    """Tests always scope promotions to their own categories, so they never touch other tests."""
    now = datetime.now(UTC)
    pid: int = await db.fetchval(
        "INSERT INTO promotions (name, rules, category_ids, starts_at, ends_at) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING id",
        "promo",
        rules or SEED_RULES,
        category_ids,
        now + starts,
        now + ends,
    )
    return pid


async def calculate(client: Client, items: list[dict[str, Any]]) -> Any:
    resp = await client.post("/api/v1/promotions/calculate", json={"items": items})
    payload = await resp.json()
    assert resp.status == 200, payload
    return payload["data"]


def _promo(pid: int, cats: set[int] | None, *tiers: tuple[int, int]) -> Promotion:
    return Promotion(
        pid, "p", tuple(Tier(a, b) for a, b in tiers), None if cats is None else frozenset(cats)
    )


@pytest.mark.unit
def test_best_tier_boundaries() -> None:
    tiers = [Tier(20_000, 3_000), Tier(50_000, 10_000)]
    assert best_tier(tiers, 19_999) is None
    assert best_tier(tiers, 20_000) == Tier(20_000, 3_000)
    assert best_tier(tiers, 49_999) == Tier(20_000, 3_000)
    assert best_tier(tiers, 50_000) == Tier(50_000, 10_000)
    assert Tier(50_000, 10_000).label == "满500减100"
    assert Tier(19_950, 50).label == "满199.50减0.50"


@pytest.mark.unit
def test_best_combination_rules() -> None:
    items = [CalcItem(0, 1, 30_000), CalcItem(1, 2, 30_000)]
    everything = _promo(1, None, (50_000, 8_000))
    cat1 = _promo(2, {1}, (20_000, 5_000))
    cat2 = _promo(3, {2}, (20_000, 5_000))
    # one tier per promotion; overlapping promotions conflict: 5000 + 5000 beats 8000
    chosen = best_combination([everything, cat1, cat2], items)
    assert [c.promotion_id for c in chosen] == [2, 3]
    assert sum(c.discount_cents for c in chosen) == 10_000
    richer = _promo(1, None, (50_000, 12_000))
    assert [c.promotion_id for c in best_combination([richer, cat1, cat2], items)] == [1]
    assert best_combination([cat1], [CalcItem(0, 2, 99_999)]) == []
    # a discount never exceeds the goods it covers
    odd = _promo(4, None, (100, 500))
    assert best_combination([odd], [CalcItem(0, None, 300)])[0] == AppliedPromotion(
        4, 300, Tier(100, 500), frozenset({0})
    )


async def test_calculate_seed_example_and_tiers(client: Client, db: asyncpg.Pool) -> None:
    cat = await make_category(db)
    name = await db.fetchval("SELECT name FROM categories WHERE id = $1", cat)
    promo = await make_promotion(db, [cat])
    unknown = 10**15 + secrets.randbelow(10**6)  # not in the catalog: the category name counts
    data = await calculate(
        client, [{"product_id": unknown, "category": name, "price": 29_900, "quantity": 2}]
    )
    assert data["original_amount"] == 59_800 and data["final_amount"] == 49_800
    assert data["promotions_applied"] == [
        {
            "promotion_id": promo,
            "discount_amount": 10_000,
            "rule_matched": "满500减100",
            "rule": {"min_amount": 50_000, "discount_amount": 10_000},
        }
    ]
    exact = await calculate(
        client, [{"product_id": unknown, "category": name, "price": 20_000, "quantity": 1}]
    )
    assert exact["promotions_applied"][0]["rule_matched"] == "满200减30"
    assert exact["final_amount"] == 17_000
    short = await calculate(
        client, [{"product_id": unknown, "category": name, "price": 19_999, "quantity": 1}]
    )
    assert short["promotions_applied"] == [] and short["final_amount"] == 19_999


async def test_calculate_uses_catalog_category_and_descendants(
    client: Client, db: asyncpg.Pool
) -> None:
    parent = await make_category(db)
    child = await make_category(db, parent)
    pid, _ = await make_listed_product(db, category_id=child)
    promo = await make_promotion(db, [parent])
    data = await calculate(
        client, [{"product_id": pid, "category": "whatever", "price": 25_000, "quantity": 1}]
    )
    assert [p["promotion_id"] for p in data["promotions_applied"]] == [promo]
    assert data["final_amount"] == 22_000


async def test_overlapping_promotions_pick_best_set(client: Client, db: asyncpg.Pool) -> None:
    a, b = await make_category(db), await make_category(db)
    both = await make_promotion(db, [a, b], [{"min_amount": 60_000, "discount_amount": 7_000}])
    only_a = await make_promotion(db, [a], [{"min_amount": 30_000, "discount_amount": 4_000}])
    only_b = await make_promotion(db, [b], [{"min_amount": 30_000, "discount_amount": 4_000}])
    pa, _ = await make_listed_product(db, category_id=a)
    pb, _ = await make_listed_product(db, category_id=b)
    items = [
        {"product_id": pa, "price": 30_000, "quantity": 1},
        {"product_id": pb, "price": 30_000, "quantity": 1},
    ]
    data = await calculate(client, items)
    assert sorted(p["promotion_id"] for p in data["promotions_applied"]) == [only_a, only_b]
    assert data["final_amount"] == 52_000
    assert both not in [p["promotion_id"] for p in data["promotions_applied"]]


async def test_window_and_listing(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    cat = await make_category(db)
    live = await make_promotion(db, [cat])
    future = await make_promotion(db, [cat], starts=HOUR, ends=2 * HOUR)
    over = await make_promotion(db, [cat], starts=-2 * HOUR, ends=-timedelta(seconds=1))
    resp = await client.get("/api/v1/promotions/amount-off")
    listed = {p["promotion_id"]: p for p in (await resp.json())["data"]}
    assert live in listed and future not in listed and over not in listed
    assert listed[live]["rules"] == SEED_RULES and listed[live]["category_ids"] == [cat]
    assert len(listed[live]["applicable_categories"]) == 1


async def test_admin_creates_promotions(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    cat = await make_category(db)
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "name": "夏季大促",
        "category_ids": [cat],
        "rules": [SEED_RULES[1], SEED_RULES[0]],
        "valid_from": (now - HOUR).isoformat(),
        "valid_until": (now + HOUR).isoformat(),
    }
    resp = await client.post("/api/v1/admin/promotions", json=body, headers=admin)
    data = (await resp.json())["data"]
    assert resp.status == 201, data
    assert data["rules"] == SEED_RULES and data["name"] == "夏季大促"
    user = auth(tokens, await make_user(db))
    resp = await client.post("/api/v1/admin/promotions", json=body, headers=user)
    assert resp.status == 403
    bad = body | {"rules": [{"min_amount": 100, "discount_amount": 200}]}
    resp = await client.post("/api/v1/admin/promotions", json=bad, headers=admin)
    assert resp.status == 422 and "rules[0].discount_amount" in (await resp.json())["fields"]
    bad = body | {"rules": [{"min_amount": 0}]}
    resp = await client.post("/api/v1/admin/promotions", json=bad, headers=admin)
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"rules[0].min_amount", "rules[0].discount_amount"}
    bad = body | {"rules": [SEED_RULES[0], SEED_RULES[0]]}
    resp = await client.post("/api/v1/admin/promotions", json=bad, headers=admin)
    assert resp.status == 422 and "rules" in (await resp.json())["fields"]
    resp = await client.post(
        "/api/v1/promotions/calculate",
        json={"items": [{"product_id": 1, "price": -1, "quantity": 0}]},
    )
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"items[0].price", "items[0].quantity"}


async def test_quote_combines_promotion_and_coupon(db: asyncpg.Pool) -> None:
    cat = await make_category(db)
    promo = await make_promotion(db, [cat])
    uid = await make_user(db)
    code = "PQ" + secrets.token_hex(5).upper()
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO coupons (code, name, type, amount_off_cents, starts_at, ends_at) "
        "VALUES ($1, 'n', 'amount_off', 2000, $2, $3)",
        code,
        now - HOUR,
        now + HOUR,
    )
    lines = [PricedLine(1, 1, cat, 2, 12_000)]
    async with connection(db) as conn:
        q = await coupons.quote(conn, user_id=uid, lines=lines, coupon_code=code)
    assert q.subtotal_cents == 24_000 and q.discount_cents == 3_000 + 2_000
    assert q.shipping_cents == 0 and q.total_cents == 19_000
    assert [p["promotion_id"] for p in q.promotions] == [promo]


async def test_preview_shows_promotion(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    cat = await make_category(db)
    await make_promotion(db, [cat], [{"min_amount": 5_000, "discount_amount": 600}])
    h = auth(tokens, await make_user(db))
    _, (sku,) = await make_listed_product(db, category_id=cat, price=2_500)
    resp = await client.post("/api/v1/cart/items", json={"sku_id": sku, "quantity": 2}, headers=h)
    assert resp.status == 200
    resp = await client.post("/api/v1/cart/checkout/preview", json={}, headers=h)
    data = (await resp.json())["data"]
    assert data["subtotal"] == 5_000 and data["discount"] == 600
    assert data["total"] == 5_000 - 600 + coupons.SHIPPING_FEE_CENTS
    assert data["promotions_applied"][0]["rule_matched"] == "满50减6"
