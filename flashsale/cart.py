"""Shopping carts: a user's cart, guest carts under a token, merge on login, checkout lines.

Storage is PostgreSQL (see migration 0030 for why not a Redis hash). A cart is
found by its owner: ``CartOwner(user_id=...)`` or ``CartOwner(guest_token=...)``.
A guest cart expires ``GUEST_CART_TTL_S`` after its last write; an expired one is
treated as absent and purged lazily when new guest carts are made.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson

from flashsale.coupons import PricedLine
from flashsale.errors import (
    CartFull,
    InsufficientStock,
    NotFound,
    NotOnSale,
    ValidationFailed,
)
from flashsale.stores.db import Conn
from flashsale.timing import GUEST_CART_TTL_S

CART_TOKEN_HEADER: Final = "X-Cart-Token"  # noqa: S105 - a header name
MAX_ITEM_QUANTITY: Final = 999
MAX_CART_ITEMS: Final = 200
GUEST_PURGE_BATCH: Final = 100
TOKEN_PATTERN: Final = r"[A-Za-z0-9_-]{20,64}"  # noqa: S105 - a format

SQL_USER_CART = """
INSERT INTO carts (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = now()
RETURNING id
"""
SQL_FIND_USER_CART = "SELECT id FROM carts WHERE user_id = $1"
SQL_USER_CART_SEQ = "SELECT id, checkout_seq FROM carts WHERE user_id = $1"
# The checkout of this cart generation is done: the next checkout is a new order.
SQL_NEXT_CHECKOUT = """
UPDATE carts SET checkout_seq = checkout_seq + 1, updated_at = now()
WHERE id = $1 AND checkout_seq = $2
"""
SQL_FIND_GUEST_CART = "SELECT id FROM carts WHERE guest_token = $1 AND expires_at > now()"
SQL_TOUCH_GUEST_CART = """
UPDATE carts SET expires_at = $2, updated_at = now()
WHERE guest_token = $1 AND expires_at > now()
RETURNING id
"""
SQL_NEW_GUEST_CART = "INSERT INTO carts (guest_token, expires_at) VALUES ($1, $2) RETURNING id"
SQL_PURGE_GUEST_CARTS = """
DELETE FROM carts WHERE id IN (
    SELECT id FROM carts WHERE guest_token IS NOT NULL AND expires_at <= now() LIMIT $1)
"""
SQL_SKU = """
SELECT s.id AS sku_id, s.product_id, s.price_cents, s.on_hand - s.reserved AS available,
       s.status AS sku_status, p.status AS product_status, s.attributes
FROM skus s JOIN products p ON p.id = s.product_id
WHERE s.id = $1
"""
SQL_PRODUCT_SKUS = """
SELECT s.id AS sku_id, s.product_id, s.price_cents, s.on_hand - s.reserved AS available,
       s.status AS sku_status, p.status AS product_status, s.attributes
FROM skus s JOIN products p ON p.id = s.product_id
WHERE s.product_id = $1
ORDER BY s.id
"""
# Same SKU and specification: quantities add up, in one statement.
SQL_ADD_ITEM = """
INSERT INTO cart_items AS ci (cart_id, product_id, sku_id, quantity, specification, spec_key)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (cart_id, sku_id, spec_key) DO UPDATE
    SET quantity = ci.quantity + EXCLUDED.quantity, selected = true, updated_at = now()
    WHERE ci.quantity + EXCLUDED.quantity <= $7
RETURNING id, quantity
"""
SQL_COUNT_ITEMS = "SELECT count(*) FROM cart_items WHERE cart_id = $1"
SQL_ITEM_QUANTITY = """
SELECT quantity FROM cart_items WHERE cart_id = $1 AND sku_id = $2 AND spec_key = $3
"""
SQL_TOTALS = """
SELECT count(*) AS total_items, COALESCE(sum(quantity), 0)::bigint AS total_quantity
FROM cart_items WHERE cart_id = $1
"""
SQL_CART_ITEMS = """
SELECT ci.id, ci.product_id, ci.sku_id, ci.quantity, ci.specification, ci.selected,
       p.name, p.images, p.category_id, s.price_cents, s.attributes AS sku_attributes,
       s.on_hand - s.reserved AS stock,
       (s.status = 'on_sale' AND p.status = 'on_sale') AS on_sale
FROM cart_items ci
JOIN skus s ON s.id = ci.sku_id
JOIN products p ON p.id = ci.product_id
WHERE ci.cart_id = $1
ORDER BY ci.id
"""
SQL_UPDATE_ITEM = """
UPDATE cart_items SET quantity = COALESCE($3, quantity), selected = COALESCE($4, selected),
       updated_at = now()
WHERE id = $1 AND cart_id = $2
RETURNING id, quantity, selected
"""
SQL_DELETE_ITEM = "DELETE FROM cart_items WHERE id = $1 AND cart_id = $2 RETURNING id"
SQL_DELETE_ITEMS = "DELETE FROM cart_items WHERE cart_id = $1 AND id = ANY($2::bigint[])"
SQL_CLEAR = "DELETE FROM cart_items WHERE cart_id = $1"
SQL_LOCK_GUEST_CART = """
SELECT id FROM carts WHERE guest_token = $1 AND expires_at > now() FOR UPDATE
"""
SQL_MERGE_ITEMS = """
INSERT INTO cart_items AS ci (cart_id, product_id, sku_id, quantity, specification, spec_key,
                              selected)
SELECT $1, product_id, sku_id, quantity, specification, spec_key, selected
FROM cart_items WHERE cart_id = $2
ON CONFLICT (cart_id, sku_id, spec_key) DO UPDATE
    SET quantity = LEAST(ci.quantity + EXCLUDED.quantity, $3), updated_at = now()
"""
SQL_DELETE_CART = "DELETE FROM carts WHERE id = $1"
SQL_CHECKOUT_RESULT = """
SELECT result FROM cart_checkouts WHERE user_id = $1 AND idempotency_key = $2
"""
SQL_SAVE_CHECKOUT = """
INSERT INTO cart_checkouts (user_id, idempotency_key, result) VALUES ($1, $2, $3)
ON CONFLICT (user_id, idempotency_key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class CartOwner:
    """Whose cart: a user (logged in) or a guest token."""

    user_id: int | None = None
    guest_token: str | None = None


def new_guest_token() -> str:
    return secrets.token_urlsafe(24)


def spec_key(specification: dict[str, Any]) -> str:
    return orjson.dumps(specification, option=orjson.OPT_SORT_KEYS).decode()


def _guest_expiry() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=GUEST_CART_TTL_S)


async def find_cart(conn: Conn, owner: CartOwner) -> int | None:
    """The cart id, without creating one (reads)."""
    if owner.user_id is not None:
        cart_id: int | None = await conn.fetchval(SQL_FIND_USER_CART, owner.user_id)
    else:
        cart_id = await conn.fetchval(SQL_FIND_GUEST_CART, owner.guest_token)
    return cart_id


async def ensure_cart(conn: Conn, owner: CartOwner) -> tuple[int, CartOwner]:
    """The cart id for a write, creating it (and a fresh token for an unknown guest)."""
    if owner.user_id is not None:
        cart_id: int = await conn.fetchval(SQL_USER_CART, owner.user_id)
        return cart_id, owner
    if owner.guest_token is not None:
        found = await conn.fetchval(SQL_TOUCH_GUEST_CART, owner.guest_token, _guest_expiry())
        if found is not None:
            return found, owner
    await conn.execute(SQL_PURGE_GUEST_CARTS, GUEST_PURGE_BATCH)
    token = new_guest_token()
    cart_id = await conn.fetchval(SQL_NEW_GUEST_CART, token, _guest_expiry())
    return cart_id, CartOwner(guest_token=token)


async def _resolve_sku(
    conn: Conn,
    *,
    product_id: int | None,
    sku_id: int | None,
    specification: dict[str, Any],
) -> asyncpg.Record:
    if sku_id is not None:
        row = await conn.fetchrow(SQL_SKU, sku_id)
        if row is None or (product_id is not None and row["product_id"] != product_id):
            raise NotFound("sku not found")
        return row
    rows = await conn.fetch(SQL_PRODUCT_SKUS, product_id)
    if not rows:
        raise NotFound("product not found")
    if len(rows) == 1:
        return rows[0]
    matching = [
        r
        for r in rows
        if specification and all(r["attributes"].get(k) == v for k, v in specification.items())
    ]
    if len(matching) == 1:
        return matching[0]
    raise ValidationFailed(
        fields={
            "sku_id": "the product has several SKUs: give sku_id or a "
            "specification that matches one"
        }
    )


async def add_item(
    pool: asyncpg.Pool,
    owner: CartOwner,
    *,
    product_id: int | None,
    sku_id: int | None,
    quantity: int,
    specification: dict[str, Any],
) -> tuple[dict[str, Any], CartOwner]:
    """Add ``quantity`` of a SKU (same SKU + specification merges); returns the seed's
    ``{cart_item_id, total_items, total_quantity}`` and the owner (a new guest token)."""
    key = spec_key(specification)
    async with pool.acquire() as conn, conn.transaction():
        sku = await _resolve_sku(
            conn, product_id=product_id, sku_id=sku_id, specification=specification
        )
        if sku["sku_status"] != "on_sale" or sku["product_status"] != "on_sale":
            raise NotOnSale
        cart_id, owner = await ensure_cart(conn, owner)
        already = await conn.fetchval(SQL_ITEM_QUANTITY, cart_id, sku["sku_id"], key) or 0
        if already == 0 and await conn.fetchval(SQL_COUNT_ITEMS, cart_id) >= MAX_CART_ITEMS:
            raise CartFull
        # a soft check: stock is only held at checkout, `available` shows it in the cart
        if sku["available"] < already + quantity:
            raise InsufficientStock(data={"available_stock": max(sku["available"], 0)})
        row = await conn.fetchrow(
            SQL_ADD_ITEM,
            cart_id,
            sku["product_id"],
            sku["sku_id"],
            quantity,
            specification,
            key,
            MAX_ITEM_QUANTITY,
        )
        if row is None:
            raise ValidationFailed(fields={"quantity": f"at most {MAX_ITEM_QUANTITY} per item"})
        totals = await conn.fetchrow(SQL_TOTALS, cart_id)
    assert totals is not None
    return {
        "cart_item_id": row["id"],
        "sku_id": sku["sku_id"],
        "quantity": row["quantity"],
        "total_items": totals["total_items"],
        "total_quantity": totals["total_quantity"],
    }, owner


def _image(images: Any) -> str | None:
    if isinstance(images, list) and images:
        first = images[0]
        if isinstance(first, str):
            return first
        if isinstance(first, dict) and isinstance(first.get("url"), str):
            return str(first["url"])
    return None


def _item(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "cart_item_id": r["id"],
        "product": {
            "id": r["product_id"],
            "name": r["name"],
            "price": r["price_cents"],
            "image": _image(r["images"]),
        },
        "sku_id": r["sku_id"],
        "sku_attributes": r["sku_attributes"],
        "quantity": r["quantity"],
        "specification": r["specification"],
        "subtotal": r["price_cents"] * r["quantity"],
        "available": bool(r["on_sale"]) and r["stock"] >= r["quantity"],
        "selected": r["selected"],
    }


def _summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "total_items": len(items),
        "total_quantity": sum(i["quantity"] for i in items),
        "total_amount": sum(i["subtotal"] for i in items),
        "selected_amount": sum(i["subtotal"] for i in items if i["selected"] and i["available"]),
    }


async def get_cart(pool: asyncpg.Pool, owner: CartOwner) -> dict[str, Any]:
    """``GET /cart``: items and summary (an unknown cart is an empty one)."""
    async with pool.acquire() as conn:
        cart_id = await find_cart(conn, owner)
        rows = [] if cart_id is None else await conn.fetch(SQL_CART_ITEMS, cart_id)
    items = [_item(r) for r in rows]
    return {"items": items, "summary": _summary(items)}


async def update_item(
    pool: asyncpg.Pool,
    owner: CartOwner,
    item_id: int,
    *,
    quantity: int | None,
    selected: bool | None,
) -> dict[str, Any]:
    """Change quantity (0 removes) and/or selection; 404 unless the item is in this cart."""
    async with pool.acquire() as conn:
        cart_id = await find_cart(conn, owner)
        if cart_id is None:
            raise NotFound("cart item not found")
        if quantity == 0:
            if await conn.fetchval(SQL_DELETE_ITEM, item_id, cart_id) is None:
                raise NotFound("cart item not found")
            return {"cart_item_id": item_id, "removed": True}
        row = await conn.fetchrow(SQL_UPDATE_ITEM, item_id, cart_id, quantity, selected)
    if row is None:
        raise NotFound("cart item not found")
    return {
        "cart_item_id": row["id"],
        "quantity": row["quantity"],
        "selected": row["selected"],
        "removed": False,
    }


async def remove_item(pool: asyncpg.Pool, owner: CartOwner, item_id: int) -> None:
    async with pool.acquire() as conn:
        cart_id = await find_cart(conn, owner)
        if cart_id is None or await conn.fetchval(SQL_DELETE_ITEM, item_id, cart_id) is None:
            raise NotFound("cart item not found")


async def clear(pool: asyncpg.Pool, owner: CartOwner) -> None:
    async with pool.acquire() as conn:
        cart_id = await find_cart(conn, owner)
        if cart_id is not None:
            await conn.execute(SQL_CLEAR, cart_id)


async def merge_guest_cart(pool: asyncpg.Pool, user_id: int, guest_token: str | None) -> int:
    """Move a guest cart into the user's cart (same SKU + specification add up, capped at
    ``MAX_ITEM_QUANTITY``) and delete it; returns the number of guest items merged.
    The guest cart row is locked first, so a concurrent second merge finds nothing."""
    if not guest_token or not re.fullmatch(TOKEN_PATTERN, guest_token):
        return 0  # a header that is not one of our tokens names no cart
    async with pool.acquire() as conn, conn.transaction():
        guest_cart = await conn.fetchval(SQL_LOCK_GUEST_CART, guest_token)
        if guest_cart is None:
            return 0
        user_cart = await conn.fetchval(SQL_USER_CART, user_id)
        status = await conn.execute(SQL_MERGE_ITEMS, user_cart, guest_cart, MAX_ITEM_QUANTITY)
        await conn.execute(SQL_DELETE_CART, guest_cart)
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True)
class Selection:
    """The cart items chosen for checkout and their pricing lines."""

    cart_id: int
    items: list[dict[str, Any]]
    lines: list[PricedLine]
    checkout_seq: int = 0

    @property
    def item_ids(self) -> list[int]:
        return [i["cart_item_id"] for i in self.items]

    @property
    def order_key(self) -> str:
        """The idempotency key of the order this checkout makes: concurrent checkouts of
        one cart generation make one order (the others replay it or get 409)."""
        return f"cart:{self.cart_id}:{self.checkout_seq}"


async def select_items(conn: Conn, user_id: int, selected_items: list[int] | None) -> Selection:
    """The given cart items (default: the selected ones); 404 for an id not in the cart,
    422 when nothing is selected."""
    cart = await conn.fetchrow(SQL_USER_CART_SEQ, user_id)
    cart_id = None if cart is None else cart["id"]
    rows = [] if cart_id is None else await conn.fetch(SQL_CART_ITEMS, cart_id)
    if selected_items is None:
        chosen = [r for r in rows if r["selected"]]
    else:
        by_id = {r["id"]: r for r in rows}
        missing = [i for i in selected_items if i not in by_id]
        if missing:
            raise NotFound(f"cart item {missing[0]} not found")
        chosen = [by_id[i] for i in dict.fromkeys(selected_items)]
    if not chosen:
        raise ValidationFailed(fields={"selected_items": "no cart items selected"})
    assert cart is not None
    lines = [
        PricedLine(r["product_id"], r["sku_id"], r["category_id"], r["quantity"], r["price_cents"])
        for r in chosen
    ]
    return Selection(cart["id"], [_item(r) for r in chosen], lines, cart["checkout_seq"])


async def previous_checkout(
    pool: asyncpg.Pool, user_id: int, idempotency_key: str | None
) -> dict[str, Any] | None:
    """The result of an earlier checkout under the same Idempotency-Key, if any."""
    if not idempotency_key:
        return None
    result: dict[str, Any] | None = await pool.fetchval(
        SQL_CHECKOUT_RESULT, user_id, idempotency_key
    )
    return result


async def finish_checkout(
    pool: asyncpg.Pool,
    selection: Selection,
    *,
    user_id: int,
    idempotency_key: str | None,
    result: dict[str, Any],
) -> None:
    """After the order exists: remove the ordered items, move the cart to its next
    checkout generation and remember the result for retries."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL_DELETE_ITEMS, selection.cart_id, selection.item_ids)
        await conn.execute(SQL_NEXT_CHECKOUT, selection.cart_id, selection.checkout_seq)
        if idempotency_key:
            await conn.execute(SQL_SAVE_CHECKOUT, user_id, idempotency_key, result)
