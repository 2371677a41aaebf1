"""Creating a regular order in undoable steps.

``create_order`` is what ``POST /orders`` and ``POST /cart/checkout`` both call. It
follows seed 002's create-order design: validate → reserve stock → coupon → insert
order, items and pay order; each step commits on its own and registers its undo, and
a later failure runs the undos in reverse. If the process dies between steps, the
reservations still expire (their ``reserved_until`` is the payment deadline plus a
grace period) and the reservation sweeper gives the units back.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import asyncpg
import orjson

from flashsale import coupons, inventory
from flashsale.errors import (
    IdempotencyInProgress,
    NotFound,
    NotOnSale,
    PriceChanged,
    PurchaseLimitExceeded,
    SkuNotFound,
    ValidationFailed,
)
from flashsale.orders.model import SQL_ORDER, Actor, new_payment_id, write_log
from flashsale.orders.views import order_amounts
from flashsale.settings import Settings
from flashsale.stores.db import Conn
from flashsale.stores.ids import OrderIds
from flashsale.timing import RESERVATION_GRACE_S

log = logging.getLogger(__name__)


MAX_LINE_QUANTITY: Final = 999
SANDBOX_PAYMENT_METHOD: Final = "alipay"


@dataclass(frozen=True, slots=True)
class OrderLineRequest:
    sku_id: int
    quantity: int
    expected_price_cents: int | None = None  # 409 PRICE_CHANGED if the price moved


SQL_USER_EXISTS = "SELECT 1 FROM users WHERE id = $1"
SQL_SKUS_FOR_ORDER = """
SELECT s.id AS sku_id, s.product_id, s.code, s.attributes AS sku_attributes, s.price_cents,
       s.status AS sku_status, p.status AS product_status, p.name, p.category_id,
       p.merchant_id, p.attributes AS product_attributes, p.images, p.max_per_user
FROM skus s JOIN products p ON p.id = s.product_id
WHERE s.id = ANY($1::bigint[])
ORDER BY s.id
"""

# Serializes one buyer's order creations (not other writes to the row: NO KEY UPDATE
# leaves the foreign-key locks of inserts alone), so the per-user cap is check-and-act.
SQL_LOCK_BUYER = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE"

SQL_HELD_BY_BUYER = """
SELECT sku_id, sum(quantity)::bigint AS held FROM stock_reservations
WHERE user_id = $1 AND status = 'active' AND sku_id = ANY($2::bigint[])
GROUP BY sku_id
"""
SQL_CLAIM_KEY = """
INSERT INTO order_idempotency (user_id, key, order_id) VALUES ($1, $2, $3)
ON CONFLICT (user_id, key) DO NOTHING
RETURNING order_id
"""
SQL_KEY_ORDER = "SELECT order_id FROM order_idempotency WHERE user_id = $1 AND key = $2"
SQL_DROP_KEY = "DELETE FROM order_idempotency WHERE user_id = $1 AND key = $2"
SQL_SNAPSHOT_INSERT = """
INSERT INTO item_snapshots (content_hash, product_id, sku_id, data) VALUES ($1, $2, $3, $4)
ON CONFLICT (content_hash) DO NOTHING
RETURNING id
"""
SQL_SNAPSHOT_BY_HASH = "SELECT id FROM item_snapshots WHERE content_hash = $1"
SQL_INSERT_ORDER = """
INSERT INTO orders (id, user_id, kind, status, total_cents, discount_cents, shipping_cents,
                    pay_cents, payment_deadline, shipping_address, coupon_code, coupon_use_id)
VALUES ($1, $2, 'regular', 'pending_payment', $3, $4, $5, $6,
        now() + make_interval(secs => $7), $8, $9, $10)
RETURNING payment_deadline
"""
SQL_INSERT_ITEM = """
INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents, snapshot_id)
VALUES ($1, $2, $3, $4, $5, $6)
"""
SQL_INSERT_PAY_ORDER = """
INSERT INTO pay_orders (id, order_id, user_id, amount_cents, method, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""
SQL_PENDING_PAYMENT = """
SELECT id, method, amount_cents, expires_at FROM pay_orders
WHERE order_id = $1 AND status = 'pending'
"""


def _merge(lines: list[OrderLineRequest]) -> dict[int, OrderLineRequest]:
    merged: dict[int, OrderLineRequest] = {}
    errors: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not 1 <= line.quantity <= MAX_LINE_QUANTITY:
            errors[f"items[{i}].quantity"] = f"must be between 1 and {MAX_LINE_QUANTITY}"
            continue
        prev = merged.get(line.sku_id)
        if prev is None:
            merged[line.sku_id] = line
        else:
            expected = (
                prev.expected_price_cents
                if line.expected_price_cents is None
                else line.expected_price_cents
            )
            merged[line.sku_id] = OrderLineRequest(
                line.sku_id, prev.quantity + line.quantity, expected
            )
    for sku_id, line in merged.items():
        if line.quantity > MAX_LINE_QUANTITY:
            errors["items"] = f"sku {sku_id}: lines add up to more than {MAX_LINE_QUANTITY}"
    if not lines:
        errors["items"] = "at least one item is required"
    if errors:
        raise ValidationFailed(fields=errors)
    return merged


def _snapshot(row: asyncpg.Record) -> tuple[str, dict[str, Any]]:
    images = row["images"] or []
    data = {
        "product_id": row["product_id"],
        "sku_id": row["sku_id"],
        "product_name": row["name"],
        "sku_code": row["code"],
        "sku_attributes": row["sku_attributes"],
        "product_attributes": row["product_attributes"],
        "image": images[0] if images else None,
        "price_cents": row["price_cents"],
    }
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return digest, data


async def snapshot_id(conn: Conn, row: asyncpg.Record) -> int:
    """The id of this item's snapshot, stored once per distinct content (seed 002 scheme 3)."""
    digest, data = _snapshot(row)
    sid: int | None = await conn.fetchval(
        SQL_SNAPSHOT_INSERT, digest, row["product_id"], row["sku_id"], data
    )
    if sid is None:
        sid = await conn.fetchval(SQL_SNAPSHOT_BY_HASH, digest)
    assert sid is not None
    return sid


async def _validate_lines(
    conn: Conn, user_id: int, merged: dict[int, OrderLineRequest]
) -> list[asyncpg.Record]:
    if await conn.fetchval(SQL_USER_EXISTS, user_id) is None:
        raise NotFound("user not found")
    rows = await conn.fetch(SQL_SKUS_FOR_ORDER, list(merged))
    found = {r["sku_id"]: r for r in rows}
    missing = [sid for sid in merged if sid not in found]
    if missing:
        raise SkuNotFound(f"sku {missing[0]} not found", data={"sku_ids": missing})
    changed = []
    for r in rows:
        if r["sku_status"] != "on_sale" or r["product_status"] != "on_sale":
            raise NotOnSale(
                f"sku {r['sku_id']} is not on sale",
                data={"sku_id": r["sku_id"]},
            )
        expected = merged[r["sku_id"]].expected_price_cents
        if expected is not None and expected != r["price_cents"]:
            changed.append(
                {
                    "sku_id": r["sku_id"],
                    "expected_price": expected,
                    "current_price": r["price_cents"],
                }
            )
    if changed:
        raise PriceChanged(
            "the price of an item changed; review the order",
            data={"items": changed},
        )
    return rows


async def _check_buyer_caps(
    conn: Conn, user_id: int, rows: list[asyncpg.Record], lines: list[coupons.PricedLine], cap: int
) -> None:
    """Refuse to hold more than a product's ``max_per_user`` (else ``cap``) units of a SKU
    in one buyer's unpaid orders. Call in the reservation transaction: the buyer lock
    makes the count and the reservations one step for that buyer."""
    await conn.execute(SQL_LOCK_BUYER, user_id)
    held_rows = await conn.fetch(SQL_HELD_BY_BUYER, user_id, [line.sku_id for line in lines])
    held = {r["sku_id"]: r["held"] for r in held_rows}
    for r, line in zip(rows, lines, strict=True):
        limit = r["max_per_user"] or cap
        already = held.get(line.sku_id, 0)
        if already + line.quantity > limit:
            raise PurchaseLimitExceeded(
                data={"sku_id": line.sku_id, "limit": limit, "held": already}
            )


async def _run_undos(conn: Conn, undos: list[Callable[[], Awaitable[Any]]]) -> None:
    for undo in reversed(undos):
        try:
            async with conn.transaction():
                await undo()
        except (asyncpg.PostgresError, OSError):
            # The reservation sweeper and the idempotency replay cover what is left.
            log.exception("undo step of a failed order creation failed")


async def create_order(
    pool: asyncpg.Pool,
    settings: Settings,
    order_ids: OrderIds,
    *,
    user_id: int,
    lines: list[OrderLineRequest],
    shipping_address: dict[str, Any],
    coupon_code: str | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """Create a regular order; returns the ``POST /orders`` response data:
    ``{"order_id", "status", "total_amount", "discount_amount", "shipping_fee",
    "final_amount", "payment_id", "payment_url", "expires_at", "version"}``; ``payment_url``
    is None here: the payer's page is an HTTP path, which the HTTP layer fills in."""
    merged = _merge(lines)
    order_id = order_ids.next(user_id)
    undos: list[Callable[[], Awaitable[Any]]] = []
    async with pool.acquire() as proxy:
        # The coupon interface is typed for a plain Connection; the pool proxy is one.
        conn = cast(asyncpg.Connection, proxy)
        if idempotency_key is not None:
            claimed = await conn.fetchval(SQL_CLAIM_KEY, user_id, idempotency_key, order_id)
            if claimed is None:
                existing = await conn.fetchval(SQL_KEY_ORDER, user_id, idempotency_key)
                return await _replay(conn, existing, user_id)
            undos.append(lambda: conn.execute(SQL_DROP_KEY, user_id, idempotency_key))
        try:
            rows = await _validate_lines(conn, user_id, merged)
            priced = [
                coupons.PricedLine(
                    r["product_id"],
                    r["sku_id"],
                    r["category_id"],
                    merged[r["sku_id"]].quantity,
                    r["price_cents"],
                )
                for r in rows
            ]
            async with conn.transaction():
                await _check_buyer_caps(conn, user_id, rows, priced, settings.max_per_user_default)
                for line in priced:  # rows are in sku id order: locks in primary-key order
                    await inventory.reserve(
                        conn,
                        sku_id=line.sku_id,
                        quantity=line.quantity,
                        order_id=order_id,
                        ttl_s=settings.payment_window_s + RESERVATION_GRACE_S,
                        user_id=user_id,
                    )
            undos.append(
                lambda: inventory.release_for_order(conn, order_id, reason="create_failed")
            )
            async with conn.transaction():
                quote = await coupons.quote(
                    conn, user_id=user_id, lines=priced, coupon_code=coupon_code
                )
                applied = await coupons.redeem(
                    conn, user_id=user_id, code=coupon_code, lines=priced, order_id=order_id
                )
            use_id = applied.coupon_use_id
            if use_id is not None:
                undos.append(lambda: coupons.unredeem(conn, use_id))
            async with conn.transaction():
                deadline = await conn.fetchval(
                    SQL_INSERT_ORDER,
                    order_id,
                    user_id,
                    quote.subtotal_cents,
                    quote.discount_cents,
                    quote.shipping_cents,
                    quote.total_cents,
                    float(settings.payment_window_s),
                    shipping_address,
                    applied.code,
                    use_id,
                )
                for r, line in zip(rows, priced, strict=True):
                    sid = await snapshot_id(conn, r)
                    await conn.execute(
                        SQL_INSERT_ITEM,
                        order_id,
                        line.product_id,
                        line.sku_id,
                        line.quantity,
                        line.unit_price_cents,
                        sid,
                    )
                pid = new_payment_id()
                await conn.execute(
                    SQL_INSERT_PAY_ORDER,
                    pid,
                    order_id,
                    user_id,
                    quote.total_cents,
                    SANDBOX_PAYMENT_METHOD,
                    deadline,
                )
                await write_log(
                    conn, order_id, Actor(user_id, "user"), None, "pending_payment", "created"
                )
        except BaseException:
            await _run_undos(conn, undos)
            raise
    return {
        "order_id": order_id,
        "status": "pending_payment",
        "total_amount": quote.subtotal_cents,
        "discount_amount": quote.discount_cents,
        "shipping_fee": quote.shipping_cents,
        "final_amount": quote.total_cents,
        "payment_id": pid,
        "payment_url": None,
        "expires_at": deadline,
        "version": 1,
        "idempotent_replay": False,
    }


async def _replay(conn: Conn, order_id: str | None, user_id: int) -> dict[str, Any]:
    order = None if order_id is None else await conn.fetchrow(SQL_ORDER, order_id)
    if order is None or order["user_id"] != user_id:
        raise IdempotencyInProgress(
            "an order with this Idempotency-Key is still being created; retry"
        )
    pay = await conn.fetchrow(SQL_PENDING_PAYMENT, order["id"])
    return {
        "order_id": order["id"],
        "status": order["status"],
        **order_amounts(order),
        "payment_id": None if pay is None else pay["id"],
        "payment_url": None,
        "expires_at": order["payment_deadline"],
        "version": order["version"],
        "idempotent_replay": True,
    }
