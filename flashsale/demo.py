"""Demo data for ``flashsale up``: accounts, a small catalog and one upcoming flash sale.

Loading is idempotent: a second ``up`` on the same data folder finds the admin
account and leaves everything as it was.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale.flash import lifecycle
from flashsale.settings import Settings
from flashsale.stores.db import Conn
from flashsale.stores.redisclient import open_redis
from flashsale.stores.scripts import FlashScripts
from flashsale.users import create_user

log = logging.getLogger(__name__)

DEMO_SALE_SKU_CODE: Final = "noise-cancelling-headphones-1"
SQL_SKU: Final = "SELECT id FROM skus WHERE code = $1"
SQL_ADMIN: Final = "SELECT id FROM users WHERE email = 'admin@demo.local'"
SQL_OPEN_SALE: Final = (
    "SELECT id FROM flash_sales WHERE sku_id = $1 AND end_at > now() AND closed_at IS NULL"
)

ACCOUNTS: Final = [
    ("admin", "admin@demo.local", "admin-pass-1", "Demo admin"),
    ("merchant", "merchant@demo.local", "merchant-pass-1", "Demo merchant"),
    *[("user", f"shopper{i}@demo.local", f"shopper-pass-{i}", f"Shopper {i}") for i in range(1, 6)],
]

CATEGORIES: Final = {
    "Electronics": {
        "Phones": {"Apple phones": {}, "Android phones": {}},
        "Computers": {"Laptops": {}, "Desktops": {}},
        "Accessories": {"Headphones": {}, "Chargers": {}},
    },
    "Clothing": {"Shoes": {}, "Jackets": {}},
}

# (category, name, description, attributes, [(sku attributes, price cents, on_hand)])
ProductSpec = tuple[str, str, str, dict[str, str], list[tuple[dict[str, str], int, int]]]
PRODUCTS: Final[list[ProductSpec]] = [
    (
        "Apple phones",
        "iPhone 15",
        "Latest Apple phone, 6.1-inch display",
        {"brand": "Apple", "screen": "6.1in"},
        [
            ({"color": "black", "storage": "128GB"}, 599900, 500),
            ({"color": "blue", "storage": "256GB"}, 699900, 300),
        ],
    ),
    (
        "Android phones",
        "Pixel 9",
        "Google phone with a great camera",
        {"brand": "Google"},
        [({"color": "obsidian", "storage": "128GB"}, 499900, 400)],
    ),
    (
        "Laptops",
        "ThinkPad X1",
        "Light business laptop, 14-inch",
        {"brand": "Lenovo"},
        [({"ram": "16GB"}, 899900, 100), ({"ram": "32GB"}, 1099900, 50)],
    ),
    (
        "Headphones",
        "Noise-cancelling headphones",
        "Over-ear, 30h battery",
        {"brand": "Sony"},
        [({"color": "black"}, 199900, 1000)],
    ),
    (
        "Chargers",
        "65W USB-C charger",
        "GaN charger with two ports",
        {"brand": "Anker"},
        [({}, 19900, 5000)],
    ),
    (
        "Shoes",
        "Running shoes",
        "Lightweight trainers",
        {"brand": "Asics"},
        [({"size": "42"}, 59900, 200), ({"size": "43"}, 59900, 200)],
    ),
    (
        "Jackets",
        "Down jacket",
        "Warm winter jacket",
        {"brand": "Uniqlo"},
        [({"size": "M"}, 49900, 150), ({"size": "L"}, 49900, 150)],
    ),
]

SQL_ADMIN_EXISTS = "SELECT id FROM users WHERE email = $1"
SQL_INSERT_CATEGORY = (
    "INSERT INTO categories (name, parent_id, sort_order) VALUES ($1, $2, $3) RETURNING id"
)
SQL_INSERT_PRODUCT = """
INSERT INTO products (merchant_id, category_id, name, description, images, attributes)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id
"""
SQL_INSERT_SKU = """
INSERT INTO skus (product_id, code, attributes, price_cents, on_hand)
VALUES ($1, $2, $3, $4, $5) RETURNING id
"""
# Every demo shopper has a default address, so a flash order it joins can be paid and shipped
# (a later `up` on an older data folder adds it).
SQL_DEMO_ADDRESSES = """
INSERT INTO addresses (user_id, name, phone, region, city, detail, postcode, is_default)
SELECT u.id, u.nickname, '13800138000', 'Beijing', 'Beijing', 'No. 1 Demo Road, Chaoyang',
       '100020', true
FROM users u
WHERE u.email LIKE 'shopper%@demo.local'
  AND NOT EXISTS (SELECT 1 FROM addresses a WHERE a.user_id = u.id)
"""


def _credentials() -> dict[str, str]:
    out: dict[str, str] = {}
    for role, email, password, _ in ACCOUNTS:
        key = role if role != "user" else "shoppers"
        if key == "shoppers":
            out.setdefault(key, "shopper1..5@demo.local / shopper-pass-1..5")
        else:
            out[key] = f"{email} / {password}"
    return out


async def _categories(conn: Conn) -> dict[str, int]:
    ids: dict[str, int] = {}

    async def add(tree: dict[str, Any], parent: int | None) -> None:
        for order, (name, children) in enumerate(tree.items()):
            cid = await conn.fetchval(SQL_INSERT_CATEGORY, name, parent, order)
            ids[name] = cid
            await add(children, cid)

    await add(CATEGORIES, None)
    return ids


async def load_demo(settings: Settings, pool: asyncpg.Pool) -> dict[str, Any]:
    """Create the demo data unless it is there; return what the banner prints."""
    info: dict[str, Any] = {"accounts": _credentials()}
    if await pool.fetchval(SQL_ADMIN_EXISTS, ACCOUNTS[0][1]) is not None:
        await pool.execute(SQL_DEMO_ADDRESSES)
        info.update(await _flash_sale(settings, pool))
        return info
    users: dict[str, int] = {}
    for role, email, password, nickname in ACCOUNTS:
        user = await create_user(
            pool, email=email, phone=None, password=password, nickname=nickname, role=role
        )
        users[email] = user.id
    await pool.execute(SQL_DEMO_ADDRESSES)
    merchant = users["merchant@demo.local"]
    async with pool.acquire() as conn, conn.transaction():
        cats = await _categories(conn)
        for cat, name, desc, attrs, skus in PRODUCTS:
            slug = name.lower().replace(" ", "-")
            pid = await conn.fetchval(
                SQL_INSERT_PRODUCT,
                merchant,
                cats[cat],
                name,
                desc,
                [f"https://img.demo.local/{slug}/1.jpg", f"https://img.demo.local/{slug}/2.jpg"],
                attrs,
            )
            for i, (sku_attrs, price, on_hand) in enumerate(skus):
                await conn.fetchval(
                    SQL_INSERT_SKU, pid, f"{slug}-{i + 1}", sku_attrs, price, on_hand
                )
    info.update(await _flash_sale(settings, pool))
    log.info("demo data loaded")
    return info


async def _flash_sale(settings: Settings, pool: asyncpg.Pool) -> dict[str, Any]:
    """The upcoming flash sale of the demo headphones: created, or loaded into Redis again
    (which may be new, e.g. flushed); what the banner prints about it."""
    sku_id = await pool.fetchval(SQL_SKU, DEMO_SALE_SKU_CODE)
    if sku_id is None:
        return {}
    redis: Redis = open_redis(settings)
    try:
        scripts = FlashScripts.register(redis)
        existing = await pool.fetchval(SQL_OPEN_SALE, sku_id)
        if existing is not None:
            row = await pool.fetchrow(lifecycle.SQL_SALE, existing)
            assert row is not None
            await lifecycle.load_sale(redis, scripts, row)
            sale = await lifecycle.sale_view(redis, existing)
        else:
            start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
            sale = await lifecycle.create_sale(
                pool,
                redis,
                scripts,
                sku_id=sku_id,
                flash_price=99900,
                quantity=100,
                per_user_limit=1,
                start_at=start,
                end_at=start + timedelta(hours=2),
                payment_window_s=900,
                created_by=await pool.fetchval(SQL_ADMIN),
            )
    finally:
        await redis.aclose()
    return {
        "flash_sale": f"id {sale['flash_sale_id']}, {sale['total_quantity']} units at "
        f"{sale['product']['flash_price']} cents, starts {sale['start_time']}"
    }
