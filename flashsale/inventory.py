"""Regular stock in PostgreSQL: reservations, their release and their consumption.

``skus.on_hand`` is what regular checkout can still sell, ``reserved`` the part of it
held by unpaid orders; available = on_hand - reserved. A reservation is one
conditional UPDATE (never read-then-write), and every movement writes one
``inventory_ledger`` row whose reason carries the reservation id, so the ledger's
``UNIQUE (order_id, reason)`` also refuses a second movement of the same units.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from flashsale.errors import (
    HeldByOrder,
    HoldExceedsOrder,
    InsufficientStock,
    NotFound,
    OrderNotPaid,
    OrderNotPending,
)
from flashsale.stores.db import Conn

# A connection, or the pool's proxy of one: what ``pool.acquire()`` gives.

LOW_STOCK_THRESHOLD: Final = 10

SQL_RESERVE_SKU = """
UPDATE skus SET reserved = reserved + $2, updated_at = now()
WHERE id = $1 AND on_hand - reserved >= $2
RETURNING id
"""
SQL_SKU_EXISTS = "SELECT on_hand - reserved AS available FROM skus WHERE id = $1"
SQL_INSERT_RESERVATION = """
INSERT INTO stock_reservations (id, sku_id, order_id, quantity, reserved_until, user_id)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5), $6)
RETURNING reserved_until
"""
SQL_LEDGER = """
INSERT INTO inventory_ledger (sku_id, order_id, delta, reason) VALUES ($1, $2, $3, $4)
"""
SQL_MARK_RELEASED = """
UPDATE stock_reservations
SET status = 'released', release_reason = $2, updated_at = now()
WHERE id = $1 AND status = 'active'
RETURNING sku_id, order_id, quantity
"""
SQL_UNRESERVE_SKU = """
UPDATE skus SET reserved = reserved - $2, updated_at = now() WHERE id = $1
"""
SQL_ACTIVE_FOR_ORDER = """
SELECT id, quantity FROM stock_reservations
WHERE order_id = $1 AND status = 'active'
ORDER BY sku_id, id
"""
SQL_MARK_CONSUMED = """
UPDATE stock_reservations
SET status = 'consumed', consumed = $2, updated_at = now()
WHERE id = $1 AND status = 'active' AND quantity >= $2
RETURNING sku_id, order_id, quantity
"""
SQL_CONSUME_SKU = """
UPDATE skus
SET on_hand = on_hand - $2, reserved = reserved - $3, sold = sold + $2, updated_at = now()
WHERE id = $1
RETURNING product_id
"""
SQL_PRODUCT_SALES = "UPDATE products SET sales = sales + $2 WHERE id = $1"
# A sold unit back on the shelf (a return, or a paid order refunded before it shipped):
# regular stock (a flash sale's units came out of on_hand when the sale was carved, and the
# sale may be over, so a returned one comes back there too). ``sold`` counts regular sales
# only (see consume), so only those are taken back.
SQL_PUT_BACK = """
UPDATE skus SET on_hand = on_hand + $2, sold = sold - least(sold, $3), updated_at = now()
WHERE id = $1
"""
SQL_SOLD_UNITS = """
SELECT sku_id, sum(quantity)::int AS quantity FROM order_items WHERE order_id = $1
GROUP BY sku_id ORDER BY sku_id
"""
SQL_GET_RESERVATION = """
SELECT r.id, r.sku_id, r.order_id, r.quantity, r.consumed, r.status, r.reserved_until,
       s.product_id
FROM stock_reservations r JOIN skus s ON s.id = r.sku_id
WHERE r.id = $1
"""
SQL_PRODUCT_STOCK = """
SELECT id AS sku_id, code, attributes, on_hand, reserved, sold, status
FROM skus WHERE product_id = $1 ORDER BY id
"""
SQL_PRODUCT = "SELECT id, merchant_id, status FROM products WHERE id = $1"
# The order line a merchant's hold is attached to (regular orders only), order row locked:
# payment (mark_paid) locks the same row first, so a hold and a payment never interleave.
SQL_ORDER_LINE_FOR_UPDATE = """
SELECT o.status, oi.quantity
FROM orders o JOIN order_items oi ON oi.order_id = o.id
WHERE o.id = $1 AND o.kind = 'regular' AND oi.sku_id = $2
FOR UPDATE OF o
"""
# Units of one order line already held (active) or sold (consumed) by its reservations.
SQL_HELD_FOR_LINE = """
SELECT coalesce(sum(CASE WHEN status = 'active' THEN quantity ELSE consumed END), 0)
FROM stock_reservations
WHERE order_id = $1 AND sku_id = $2 AND status IN ('active', 'consumed')
"""
SQL_ORDER_STATUS_FOR_SHARE = "SELECT status FROM orders WHERE id = $1 FOR SHARE"
PAID_STATUSES: Final = ("paid", "shipped", "delivered", "completed")
SQL_EXPIRED = """
SELECT id FROM stock_reservations
WHERE status = 'active' AND reserved_until < now()
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    sku_id: int
    order_id: str | None
    quantity: int
    expires_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "reservation_id": self.reservation_id,
            "sku_id": self.sku_id,
            "order_id": self.order_id,
            "reserved_quantity": self.quantity,
            "expires_at": self.expires_at,
        }


def new_reservation_id() -> str:
    return "RSV" + secrets.token_hex(10).upper()


def insufficient(sku_id: int, available: int | None) -> InsufficientStock:
    return InsufficientStock(
        f"not enough stock for sku {sku_id}",
        data={"sku_id": sku_id, "available_stock": available},
    )


async def reserve(
    conn: Conn,
    *,
    sku_id: int,
    quantity: int,
    order_id: str | None,
    ttl_s: int,
    user_id: int | None = None,
) -> Reservation:
    """Hold ``quantity`` units of a SKU until ``ttl_s`` from now; 409 INSUFFICIENT_STOCK.
    ``user_id`` is the buyer whose order holds them (counted by the per-user cap).

    Call inside a transaction: the SKU update, the reservation and its ledger row
    commit together.
    """
    if await conn.fetchval(SQL_RESERVE_SKU, sku_id, quantity) is None:
        available = await conn.fetchval(SQL_SKU_EXISTS, sku_id)
        if available is None:
            raise NotFound(f"sku {sku_id} not found")
        raise insufficient(sku_id, available)
    rid = new_reservation_id()
    until: datetime = await conn.fetchval(
        SQL_INSERT_RESERVATION, rid, sku_id, order_id, quantity, float(ttl_s), user_id
    )
    await conn.execute(SQL_LEDGER, sku_id, order_id, -quantity, f"reserve:{rid}")
    return Reservation(rid, sku_id, order_id, quantity, until)


async def merchant_reserve(
    conn: Conn, *, sku_id: int, quantity: int, order_id: str | None, ttl_s: int
) -> Reservation:
    """A merchant's hold (the inventory API), on its own or attached to an order. The order
    must be a regular one containing ``sku_id`` (else 404, as for a missing order), still
    awaiting payment, and the hold may not exceed what the line still needs: everything a
    payment consumes then stays within what the buyer ordered. Call in a transaction."""
    if order_id is not None:
        line = await conn.fetchrow(SQL_ORDER_LINE_FOR_UPDATE, order_id, sku_id)
        if line is None:
            raise NotFound("order not found")
        if line["status"] != "pending_payment":
            raise OrderNotPending(data={"status": line["status"]})
        remaining = line["quantity"] - await conn.fetchval(SQL_HELD_FOR_LINE, order_id, sku_id)
        if quantity > remaining:
            raise HoldExceedsOrder(data={"sku_id": sku_id, "remaining": max(remaining, 0)})
    return await reserve(conn, sku_id=sku_id, quantity=quantity, order_id=order_id, ttl_s=ttl_s)


async def consume_paid(conn: Conn, held: dict[str, Any], actual_quantity: int) -> bool:
    """The inventory API's consume: only a reservation of a paid order is sold, so no
    one makes sales (and ``sort=sales`` rank) out of holds nobody paid for."""
    order_id = held["order_id"]
    status = None if order_id is None else await conn.fetchval(SQL_ORDER_STATUS_FOR_SHARE, order_id)
    if status not in PAID_STATUSES:
        raise OrderNotPaid(data={"order_id": order_id, "status": status})
    return await consume(conn, held["id"], actual_quantity)


async def release_unowned(conn: Conn, held: dict[str, Any], *, reason: str) -> bool:
    """The inventory API's release: not the hold of an order awaiting payment (its
    cancel or timeout releases it; releasing it early would let the order oversell)."""
    order_id = held["order_id"]
    if order_id is not None:
        status = await conn.fetchval(SQL_ORDER_STATUS_FOR_SHARE, order_id)
        if status == "pending_payment":
            raise HeldByOrder(data={"order_id": order_id})
    return await release(conn, held["id"], reason=reason)


async def release(conn: Conn, reservation_id: str, *, reason: str) -> bool:
    """Give an active reservation's units back, exactly once; False if it was not active."""
    row = await conn.fetchrow(SQL_MARK_RELEASED, reservation_id, reason)
    if row is None:
        return False
    await conn.execute(SQL_UNRESERVE_SKU, row["sku_id"], row["quantity"])
    await conn.execute(
        SQL_LEDGER, row["sku_id"], row["order_id"], row["quantity"], f"release:{reservation_id}"
    )
    return True


async def release_for_order(conn: Conn, order_id: str, *, reason: str) -> int:
    """Release every active reservation of an order (in SKU order); the number released."""
    released = 0
    for rec in await conn.fetch(SQL_ACTIVE_FOR_ORDER, order_id):
        if await release(conn, rec["id"], reason=reason):
            released += 1
    return released


async def consume(conn: Conn, reservation_id: str, actual_quantity: int) -> bool:
    """Turn ``actual_quantity`` reserved units into sold ones and drop the rest of the hold.

    False if the reservation is not active or holds fewer units than asked.
    """
    row = await conn.fetchrow(SQL_MARK_CONSUMED, reservation_id, actual_quantity)
    if row is None:
        return False
    product_id = await conn.fetchval(
        SQL_CONSUME_SKU, row["sku_id"], actual_quantity, row["quantity"]
    )
    if actual_quantity:
        await conn.execute(SQL_PRODUCT_SALES, product_id, actual_quantity)
    await conn.execute(
        SQL_LEDGER, row["sku_id"], row["order_id"], -actual_quantity, f"consume:{reservation_id}"
    )
    return True


async def consume_for_order(conn: Conn, order_id: str) -> int:
    """Consume every active reservation of a paid order in full; the number consumed."""
    consumed = 0
    for rec in await conn.fetch(SQL_ACTIVE_FOR_ORDER, order_id):
        if await consume(conn, rec["id"], rec["quantity"]):
            consumed += 1
    return consumed


async def put_back(
    conn: Conn, sku_id: int, order_id: str, quantity: int, *, regular: bool, reason: str
) -> None:
    """``quantity`` sold units of ``sku_id`` back on the shelf, with a ledger row."""
    await conn.execute(SQL_PUT_BACK, sku_id, quantity, quantity if regular else 0)
    await conn.execute(SQL_LEDGER, sku_id, order_id, quantity, reason)


async def put_back_order(conn: Conn, order_id: str, *, reason: str) -> None:
    """Every unit of a paid regular order back on the shelf (in SKU order: lock order)."""
    for line in await conn.fetch(SQL_SOLD_UNITS, order_id):
        await put_back(
            conn, line["sku_id"], order_id, line["quantity"], regular=True, reason=reason
        )


async def release_expired(pool: asyncpg.Pool, *, batch: int = 200) -> int:
    """One sweep: release reservations past ``reserved_until``. Safe with many sweepers:
    rows another sweeper holds are skipped, and release() is guarded by the status."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(SQL_EXPIRED, batch)
        released = 0
        for rec in rows:
            if await release(conn, rec["id"], reason="expired"):
                released += 1
        return released


def stock_status(available: int) -> str:
    if available <= 0:
        return "out_of_stock"
    return "low" if available < LOW_STOCK_THRESHOLD else "sufficient"


async def product_stock(conn: Conn, product_id: int) -> dict[str, Any]:
    """Seed §6.3 stock view: product totals plus one entry per SKU."""
    if await conn.fetchrow(SQL_PRODUCT, product_id) is None:
        raise NotFound("product not found")
    skus = []
    for r in await conn.fetch(SQL_PRODUCT_STOCK, product_id):
        available = r["on_hand"] - r["reserved"]
        skus.append(
            {
                "sku_id": r["sku_id"],
                "code": r["code"],
                "attributes": r["attributes"],
                "available_stock": available,
                "reserved_stock": r["reserved"],
                "total_stock": r["on_hand"],
                "sold": r["sold"],
                "status": stock_status(available),
            }
        )
    available = sum(s["available_stock"] for s in skus)
    return {
        "product_id": product_id,
        "available_stock": available,
        "reserved_stock": sum(s["reserved_stock"] for s in skus),
        "total_stock": sum(s["total_stock"] for s in skus),
        "status": stock_status(available),
        "skus": skus,
    }


async def get_reservation(conn: Conn, reservation_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(SQL_GET_RESERVATION, reservation_id)
    return None if row is None else dict(row)
