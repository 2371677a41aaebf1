"""What a shopper reads of orders: one order (stored, or a flash order still in flight),
the list, and the operation log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale.errors import NotFound
from flashsale.flash import views as flash_views
from flashsale.flash.cache import SaleState
from flashsale.orders.model import SQL_ORDER, Actor, load_own
from flashsale.paging import offset, page_of
from flashsale.stores.db import Conn

SQL_ITEMS = """
SELECT oi.product_id, oi.sku_id, oi.quantity, oi.price_cents, oi.snapshot_id,
       sn.data AS snapshot
FROM order_items oi LEFT JOIN item_snapshots sn ON sn.id = oi.snapshot_id
WHERE oi.order_id = $1
ORDER BY oi.id
"""
SQL_LATEST_PAYMENT = """
SELECT id, method, status, amount_cents, transaction_id, paid_at, expires_at
FROM pay_orders WHERE order_id = $1
ORDER BY (status = 'success') DESC, created_at DESC
LIMIT 1
"""
SQL_LIST = """
SELECT id, kind, status, total_cents, discount_cents, shipping_cents, pay_cents, version,
       created_at, payment_deadline, count(*) OVER () AS total
FROM orders
WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC, id DESC
LIMIT $3 OFFSET $4
"""
SQL_COUNT = "SELECT count(*) FROM orders WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)"
RETURN_COLUMNS = """
id, order_id, user_id, kind, status, reason, amount_cents, items, decided_by, decision_note,
refund_id, restocked, created_at, decided_at, refunded_at, approved_cents
"""
SQL_RETURNS_OF_ORDER = (
    f"SELECT {RETURN_COLUMNS} FROM order_returns WHERE order_id = $1 ORDER BY created_at, id"  # noqa: S608
)
SQL_LOGS = """
SELECT actor_id, actor_role, from_status, to_status, note, created_at
FROM order_logs WHERE order_id = $1 ORDER BY id
"""


def return_view(r: asyncpg.Record) -> dict[str, Any]:
    """A return request (see :mod:`flashsale.orders.returns`)."""
    return {
        "return_id": r["id"],
        "order_id": r["order_id"],
        "user_id": r["user_id"],
        "kind": r["kind"],
        "status": r["status"],
        "reason": r["reason"],
        "amount": r["amount_cents"],
        "approved_amount": r["approved_cents"],
        "items": r["items"],
        "decided_by": r["decided_by"],
        "decision_note": r["decision_note"],
        "refund_id": r["refund_id"],
        "restocked": r["restocked"],
        "created_at": r["created_at"],
        "decided_at": r["decided_at"],
        "refunded_at": r["refunded_at"],
    }


async def returns_of_order(conn: Conn, order_id: str) -> list[dict[str, Any]]:
    return [return_view(r) for r in await conn.fetch(SQL_RETURNS_OF_ORDER, order_id)]


def shipping_info(order: asyncpg.Record) -> dict[str, Any]:
    """Where the order goes (its address snapshot) and how it travels."""
    address = order["shipping_address"] or {}
    return {
        "name": address.get("name"),
        "phone": address.get("phone"),
        "address": address.get("address"),
        "region": address.get("region"),
        "city": address.get("city"),
        "detail": address.get("detail"),
        "postcode": address.get("postcode"),
        "address_id": address.get("address_id"),
        "shipping_company": order["shipping_company"],
        "tracking_number": order["tracking_number"],
        "estimated_delivery": order["estimated_delivery"],
        "shipped_at": order["shipped_at"],
        "delivered_at": order["delivered_at"],
    }


def item_view(r: asyncpg.Record) -> dict[str, Any]:
    snap = r["snapshot"] or {}
    return {
        "product_id": r["product_id"],
        "sku_id": r["sku_id"],
        "product_name": snap.get("product_name"),
        "sku_attributes": snap.get("sku_attributes"),
        "image": snap.get("image"),
        "quantity": r["quantity"],
        "price": r["price_cents"],
        "subtotal": r["price_cents"] * r["quantity"],
        "snapshot_id": r["snapshot_id"],
    }


def order_head(order: asyncpg.Record) -> dict[str, Any]:
    """What every view of an order starts with."""
    return {
        "order_id": order["id"],
        "kind": order["kind"],
        "status": order["status"],
        "version": order["version"],
        "created_at": order["created_at"],
    }


# The API's name of each money column of an order (cents).
AMOUNTS: Final = {
    "total_amount": "total_cents",
    "discount_amount": "discount_cents",
    "shipping_fee": "shipping_cents",
    "final_amount": "pay_cents",
}


def order_amounts(order: asyncpg.Record) -> dict[str, Any]:
    """An order's money as the API names it."""
    return {name: order[column] for name, column in AMOUNTS.items()}


async def order_detail(conn: Conn, order: asyncpg.Record) -> dict[str, Any]:
    items = [item_view(r) for r in await conn.fetch(SQL_ITEMS, order["id"])]
    pay = await conn.fetchrow(SQL_LATEST_PAYMENT, order["id"])
    return {
        **order_head(order),
        "updated_at": order["updated_at"],
        **order_amounts(order),
        "refunded_amount": order["refunded_cents"],
        "coupon_code": order["coupon_code"],
        "payment_deadline": order["payment_deadline"],
        "cancelled_at": order["cancelled_at"],
        "cancel_reason": order["cancel_reason"],
        "completed_at": order["completed_at"],
        "items": items,
        "shipping_info": shipping_info(order),
        "returns": await returns_of_order(conn, order["id"]),
        "payment_info": None
        if pay is None
        else {
            "payment_id": pay["id"],
            "method": pay["method"],
            "status": pay["status"],
            "amount": pay["amount_cents"],
            "transaction_id": pay["transaction_id"],
            "paid_at": pay["paid_at"],
            "expires_at": pay["expires_at"],
        },
    }


async def get_order(
    pool: asyncpg.Pool,
    redis: Redis,
    sales: Mapping[int, SaleState],
    order_id: str,
    user_id: int,
) -> dict[str, Any]:
    """The caller's order (404 for anyone else's); a flash order still in flight too
    (looked up in the reservation logs of ``sales``)."""
    async with pool.acquire() as conn:
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is not None:
            if order["user_id"] != user_id:
                raise NotFound("order not found")
            return await order_detail(conn, order)
    queued = await flash_views.queued_order(redis, sales, order_id, user_id)
    if queued is None:
        raise NotFound("order not found")
    return queued


async def list_orders(
    pool: asyncpg.Pool, user_id: int, *, status: str | None, page: int, limit: int
) -> dict[str, Any]:
    rows = await pool.fetch(SQL_LIST, user_id, status, limit, offset(page, limit))
    total = rows[0]["total"] if rows else await pool.fetchval(SQL_COUNT, user_id, status)
    orders = [
        {
            "order_id": r["id"],
            "kind": r["kind"],
            "status": r["status"],
            **order_amounts(r),
            "version": r["version"],
            "created_at": r["created_at"],
            "payment_deadline": r["payment_deadline"],
        }
        for r in rows
    ]
    return page_of("orders", orders, total=total, page=page, limit=limit)


async def order_logs(pool: asyncpg.Pool, order_id: str, actor: Actor) -> list[dict[str, Any]]:
    """The operation log of the caller's order (any order for an admin)."""
    async with pool.acquire() as conn:
        await load_own(conn, order_id, actor)
        return [dict(r) for r in await conn.fetch(SQL_LOGS, order_id)]
