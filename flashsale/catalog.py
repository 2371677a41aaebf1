"""Catalog: product listing and search, product detail (cached in Redis), categories,
and the merchant's create / update / delete.

Money is integer cents; a product's ``price`` is the lowest price of its on-sale SKUs
and its ``stock`` the sum of their available units (``on_hand - reserved``).

The detail cache is best effort: a Redis failure is logged and the database answers.
Writers delete the key after their transaction commits; the TTL bounds how long a
reader that raced a writer can keep a stale copy (and how stale cached stock gets,
since checkout moves stock without touching the catalog).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson
from redis.asyncio import Redis

from flashsale.auth import Principal
from flashsale.errors import (
    Forbidden,
    NotFound,
    ProductInUse,
    StockBelowReserved,
    ValidationFailed,
    VersionConflict,
)
from flashsale.paging import offset, page_of
from flashsale.stores import tasks
from flashsale.stores.db import Conn
from flashsale.timing import PRODUCT_DETAIL_TTL_S

log = logging.getLogger(__name__)


MAX_LIMIT: Final = 100
SORTS: Final = {
    "created,desc": "created_at DESC, id DESC",
    "price,asc": "price ASC NULLS LAST, id ASC",
    "price,desc": "price DESC NULLS LAST, id DESC",
    "sales,desc": "sales DESC, id DESC",
}
UNFINISHED_ORDER_STATUSES: Final = ("pending_payment", "paid", "shipped", "delivered")


def detail_key(product_id: int) -> str:
    """The Redis key of one product's cached detail (hash-tagged by product)."""
    return f"cat:{{product:{product_id}}}:detail"


# --- listing -----------------------------------------------------------------------------

# $1 category id, $2 category name, $3 filter by category?, $4 price_min, $5 price_max,
# $6 the longest search pattern (what the trigram index can serve), $7 every pattern (all
# must match name or description).
_LIST_FROM = """
WITH RECURSIVE cat AS (
    SELECT id FROM categories
    WHERE $3::boolean AND (id = $1::bigint OR lower(name) = lower($2::text))
    UNION
    SELECT c.id FROM categories c JOIN cat ON c.parent_id = cat.id
), base AS (
    SELECT p.id, p.name, p.images, p.sales, p.created_at, c.name AS category,
           s.price, s.stock
    FROM products p
    LEFT JOIN categories c ON c.id = p.category_id
    CROSS JOIN LATERAL (
        SELECT min(k.price_cents) AS price, coalesce(sum(k.on_hand - k.reserved), 0) AS stock
        FROM skus k WHERE k.product_id = p.id AND k.status = 'on_sale'
    ) s
    WHERE p.status = 'on_sale'
      AND (NOT $3::boolean OR p.category_id IN (SELECT id FROM cat))
      AND ($4::bigint IS NULL OR s.price >= $4::bigint)
      AND ($5::bigint IS NULL OR s.price <= $5::bigint)
      AND ($6::text IS NULL OR (p.name || ' ' || p.description) ILIKE $6::text)
      AND ($7::text[] IS NULL OR (p.name || ' ' || p.description) ILIKE ALL ($7::text[]))
)
"""
SQL_COUNT_PRODUCTS: Final = _LIST_FROM + "SELECT count(*) FROM base"  # noqa: S608
SQL_LIST_PRODUCTS: Final = {
    sort: _LIST_FROM + f"SELECT * FROM base ORDER BY {order} LIMIT $8 OFFSET $9"  # noqa: S608
    for sort, order in SORTS.items()
}


@dataclass(frozen=True, slots=True)
class ProductQuery:
    category: str | None = None
    price_min: int | None = None
    price_max: int | None = None
    q: str | None = None
    sort: str = "created,desc"
    page: int = 1
    limit: int = 20


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _list_item(r: asyncpg.Record) -> dict[str, Any]:
    images = r["images"] or []
    return {
        "id": r["id"],
        "name": r["name"],
        "price": r["price"],
        "image": images[0] if images else None,
        "stock": r["stock"],
        "category": r["category"],
        "sales": r["sales"],
    }


async def list_products(pool: asyncpg.Pool, query: ProductQuery) -> dict[str, Any]:
    """One page of on-sale products: ``{products, total, page, limit}``."""
    cat_id: int | None = None
    cat_name: str | None = None
    if query.category:
        if query.category.isascii() and query.category.isdigit() and len(query.category) < 19:
            cat_id = int(query.category)
        else:
            cat_name = query.category
    terms = query.q.split() if query.q else []
    patterns = [_like_pattern(t) for t in terms] or None
    longest = _like_pattern(max(terms, key=len)) if terms else None
    args = (
        cat_id,
        cat_name,
        query.category is not None,
        query.price_min,
        query.price_max,
        longest,
        patterns,
    )
    skip = offset(query.page, query.limit)
    async with pool.acquire() as conn:
        rows = await conn.fetch(SQL_LIST_PRODUCTS[query.sort], *args, query.limit, skip)
        total = await conn.fetchval(SQL_COUNT_PRODUCTS, *args)
    items = [_list_item(r) for r in rows]
    return page_of("products", items, total=total, page=query.page, limit=query.limit)


# --- categories --------------------------------------------------------------------------

SQL_ALL_CATEGORIES: Final = "SELECT id, name, parent_id FROM categories ORDER BY sort_order, id"


async def category_tree(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every category as a nested tree (seed 000 §2.3)."""
    rows = await pool.fetch(SQL_ALL_CATEGORIES)
    nodes = {
        r["id"]: {"id": r["id"], "name": r["name"], "parent_id": r["parent_id"], "children": []}
        for r in rows
    }
    roots: list[dict[str, Any]] = []
    for r in rows:
        parent = nodes.get(r["parent_id"]) if r["parent_id"] is not None else None
        (parent["children"] if parent is not None else roots).append(nodes[r["id"]])
    return roots


# --- detail ------------------------------------------------------------------------------

SQL_PRODUCT: Final = """
SELECT id, merchant_id, category_id, name, description, images, attributes, status, sales,
       version, created_at, updated_at, max_per_user
FROM products WHERE id = $1
"""
SQL_PRODUCT_SKUS: Final = """
SELECT id, code, attributes, price_cents, on_hand, reserved, status
FROM skus WHERE product_id = $1 ORDER BY id
"""
# The category and its ancestors, the category itself first.
SQL_CATEGORY_PATH: Final = """
WITH RECURSIVE up AS (
    SELECT id, name, parent_id, 0 AS depth FROM categories WHERE id = $1
    UNION ALL
    SELECT c.id, c.name, c.parent_id, up.depth + 1 FROM categories c JOIN up ON c.id = up.parent_id
)
SELECT id, name, parent_id FROM up ORDER BY depth DESC
"""


async def load_detail(conn: Conn | asyncpg.Pool, product_id: int) -> dict[str, Any] | None:
    """The detail of an on-sale product from the database, or None."""
    p = await conn.fetchrow(SQL_PRODUCT, product_id)
    if p is None or p["status"] != "on_sale":
        return None
    skus = [s for s in await conn.fetch(SQL_PRODUCT_SKUS, product_id) if s["status"] == "on_sale"]
    category: dict[str, Any] | None = None
    path: list[dict[str, Any]] = []
    if p["category_id"] is not None:
        rows = await conn.fetch(SQL_CATEGORY_PATH, p["category_id"])
        path = [{"id": r["id"], "name": r["name"]} for r in rows]
        leaf = rows[-1]
        category = {
            "id": leaf["id"],
            "name": leaf["name"],
            "parent": rows[-2]["name"] if len(rows) > 1 else None,
            "parent_id": leaf["parent_id"],
        }
    images = p["images"] or []
    sku_out = [
        {
            "id": s["id"],
            "code": s["code"],
            "attributes": s["attributes"],
            "price": s["price_cents"],
            "stock": s["on_hand"] - s["reserved"],
        }
        for s in skus
    ]
    return {
        "id": p["id"],
        "name": p["name"],
        "description": p["description"],
        "price": min((s["price"] for s in sku_out), default=None),
        "images": images,
        "image": images[0] if images else None,
        "stock": sum(s["stock"] for s in sku_out),
        "category": category,
        "category_path": path,
        "attributes": p["attributes"],
        "skus": sku_out,
        "merchant_id": p["merchant_id"],
        "status": p["status"],
        "sales": p["sales"],
        "max_per_user": p["max_per_user"],
        "version": p["version"],
        "created_at": p["created_at"].isoformat(),
        "updated_at": p["updated_at"].isoformat(),
    }


async def _cache_get(redis: Redis, product_id: int) -> dict[str, Any] | None:
    raw = None  # the database answers when the cache cannot
    with tasks.guarded("product cache read"):
        raw = await redis.get(detail_key(product_id))
    if raw is None:
        return None
    value: dict[str, Any] = orjson.loads(raw)
    return value


async def _cache_set(redis: Redis, product_id: int, detail: dict[str, Any]) -> None:
    with tasks.guarded("product cache write"):
        await redis.set(detail_key(product_id), orjson.dumps(detail), ex=PRODUCT_DETAIL_TTL_S)


async def invalidate(redis: Redis, product_id: int) -> None:
    """Drop a product's cached detail; a Redis failure only logs (the TTL expires it)."""
    with tasks.guarded(f"product cache invalidation of {product_id}"):
        await redis.delete(detail_key(product_id))


async def product_detail(pool: asyncpg.Pool, redis: Redis, product_id: int) -> dict[str, Any]:
    """The product detail, from the cache when it is there; 404 unless on sale."""
    cached = await _cache_get(redis, product_id)
    if cached is not None:
        return cached
    detail = await load_detail(pool, product_id)
    if detail is None:
        raise NotFound("product not found")
    await _cache_set(redis, product_id, detail)
    return detail


# --- writes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SkuInput:
    price: int | None
    stock: int | None
    attributes: dict[str, Any] | None = None
    code: str | None = None
    id: int | None = None


SQL_INSERT_PRODUCT: Final = """
INSERT INTO products (merchant_id, category_id, name, description, images, attributes,
                      max_per_user)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id
"""
SQL_INSERT_SKU: Final = """
INSERT INTO skus (product_id, code, attributes, price_cents, on_hand)
VALUES ($1, $2, $3, $4, $5) RETURNING id
"""
SQL_CATEGORY_EXISTS: Final = "SELECT EXISTS (SELECT 1 FROM categories WHERE id = $1)"
SQL_LOCK_PRODUCT: Final = (
    "SELECT merchant_id, version, status FROM products WHERE id = $1 FOR UPDATE"
)
SQL_UPDATE_PRODUCT: Final = """
UPDATE products SET
    name = coalesce($2, name),
    description = coalesce($3, description),
    category_id = CASE WHEN $4::boolean THEN $5::bigint ELSE category_id END,
    images = coalesce($6, images),
    attributes = coalesce($7, attributes),
    status = coalesce($8, status),
    max_per_user = CASE WHEN $9::boolean THEN $10::integer ELSE max_per_user END,
    version = version + 1,
    updated_at = now()
WHERE id = $1
RETURNING version
"""
# Stock may not drop below what unpaid orders hold: the update is conditional, not a
# read-then-write.
SQL_UPDATE_SKU: Final = """
UPDATE skus SET
    price_cents = coalesce($3, price_cents),
    on_hand = coalesce($4, on_hand),
    attributes = coalesce($5, attributes),
    updated_at = now()
WHERE id = $1 AND product_id = $2 AND ($4::integer IS NULL OR reserved <= $4::integer)
RETURNING id
"""
SQL_SKU_OF_PRODUCT: Final = "SELECT reserved FROM skus WHERE id = $1 AND product_id = $2"
SQL_PRODUCT_SKU_IDS: Final = "SELECT id FROM skus WHERE product_id = $1 ORDER BY id FOR UPDATE"
SQL_IN_UNFINISHED_ORDERS: Final = """
SELECT EXISTS (
    SELECT 1 FROM order_items oi JOIN orders o ON o.id = oi.order_id
    WHERE oi.product_id = $1 AND o.status = ANY($2::text[])
)
"""
SQL_TAKE_OFF_SALE: Final = """
UPDATE products SET status = 'off_sale', version = version + 1, updated_at = now() WHERE id = $1
"""


def _require_seller(principal: Principal) -> None:
    if principal.role not in ("merchant", "admin"):
        raise Forbidden("requires role: merchant or admin")


async def _check_category(conn: Conn, category_id: int | None) -> None:
    if category_id is not None and not await conn.fetchval(SQL_CATEGORY_EXISTS, category_id):
        raise ValidationFailed(fields={"category_id": "unknown category"})


async def create_product(
    pool: asyncpg.Pool,
    principal: Principal,
    *,
    name: str,
    description: str,
    category_id: int | None,
    images: list[str],
    attributes: dict[str, Any],
    skus: list[SkuInput],
    max_per_user: int | None = None,
) -> int:
    """Insert a product and its SKUs for the calling merchant; return its id.
    ``max_per_user`` caps the units one buyer may hold unpaid (None: the setting)."""
    _require_seller(principal)
    async with pool.acquire() as conn, conn.transaction():
        await _check_category(conn, category_id)
        pid: int = await conn.fetchval(
            SQL_INSERT_PRODUCT,
            principal.user_id,
            category_id,
            name,
            description,
            images,
            attributes,
            max_per_user,
        )
        for sku in skus:
            await conn.fetchval(
                SQL_INSERT_SKU, pid, sku.code, sku.attributes or {}, sku.price, sku.stock or 0
            )
    return pid


async def _lock_owned(conn: Conn, principal: Principal, product_id: int) -> asyncpg.Record:
    _require_seller(principal)
    row = await conn.fetchrow(SQL_LOCK_PRODUCT, product_id)
    if row is None:
        raise NotFound("product not found")
    if principal.role != "admin" and row["merchant_id"] != principal.user_id:
        raise Forbidden("this product belongs to another merchant")
    return row


async def update_product(
    pool: asyncpg.Pool,
    redis: Redis,
    principal: Principal,
    product_id: int,
    fields: dict[str, Any],
    skus: list[SkuInput],
    *,
    version: int | None,
    flat: SkuInput | None = None,
) -> int:
    """Update a product's fields and SKUs (owner or admin); return the new version.

    ``fields`` holds only what the client sent. SKUs with an id are updated, SKUs without
    one are added; ``flat`` (the seed's top-level ``price``/``stock``) applies to the only
    SKU of a single-SKU product. A stale ``version`` is a 409 VERSION_CONFLICT.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await _lock_owned(conn, principal, product_id)
        if version is not None and version != row["version"]:
            raise VersionConflict(
                "the product was changed by someone else; reload and retry",
                data={"version": row["version"]},
            )
        if flat is not None:
            ids = [r["id"] for r in await conn.fetch(SQL_PRODUCT_SKU_IDS, product_id)]
            if len(ids) != 1:
                raise ValidationFailed(
                    fields={
                        "price": "the product has several SKUs; use skus",
                        "stock": "the product has several SKUs; use skus",
                    }
                )
            skus = [SkuInput(price=flat.price, stock=flat.stock, id=ids[0]), *skus]
        if fields.get("status") == "off_sale" and row["status"] == "on_sale":
            await _refuse_if_in_use(conn, product_id)
        if "category_id" in fields:
            await _check_category(conn, fields["category_id"])
        for i, sku in enumerate(skus):
            if sku.id is None:
                if sku.price is None:
                    raise ValidationFailed(fields={f"skus[{i}].price": "is required for a new SKU"})
                await conn.fetchval(
                    SQL_INSERT_SKU,
                    product_id,
                    sku.code,
                    sku.attributes or {},
                    sku.price,
                    sku.stock or 0,
                )
                continue
            done = await conn.fetchval(
                SQL_UPDATE_SKU, sku.id, product_id, sku.price, sku.stock, sku.attributes
            )
            if done is None:
                reserved = await conn.fetchval(SQL_SKU_OF_PRODUCT, sku.id, product_id)
                if reserved is None:
                    raise ValidationFailed(fields={f"skus[{i}].id": "no such SKU on this product"})
                raise StockBelowReserved(
                    f"stock of SKU {sku.id} cannot go below the {reserved} units "
                    "held by unpaid orders",
                    data={"sku_id": sku.id, "reserved": reserved},
                )
        new_version: int = await conn.fetchval(
            SQL_UPDATE_PRODUCT,
            product_id,
            fields.get("name"),
            fields.get("description"),
            "category_id" in fields,
            fields.get("category_id"),
            fields.get("images"),
            fields.get("attributes"),
            fields.get("status"),
            "max_per_user" in fields,
            fields.get("max_per_user"),
        )
    await invalidate(redis, product_id)
    return new_version


async def _refuse_if_in_use(conn: Conn, product_id: int) -> None:
    await conn.fetch(SQL_PRODUCT_SKU_IDS, product_id)
    if await conn.fetchval(SQL_IN_UNFINISHED_ORDERS, product_id, list(UNFINISHED_ORDER_STATUSES)):
        raise ProductInUse


async def delete_product(
    pool: asyncpg.Pool, redis: Redis, principal: Principal, product_id: int
) -> None:
    """Take a product off sale (soft delete); 409 PRODUCT_IN_USE while unfinished orders
    reference it.

    The product's SKU rows are locked first, so an order that reserves stock on them waits
    for this transaction and then sees the product off sale.
    """
    async with pool.acquire() as conn, conn.transaction():
        await _lock_owned(conn, principal, product_id)
        await _refuse_if_in_use(conn, product_id)
        await conn.execute(SQL_TAKE_OFF_SALE, product_id)
    await invalidate(redis, product_id)
