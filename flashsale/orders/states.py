"""The order state machine: cancel, pay, ship, deliver, confirm, and the timeout close.

Every state change is an optimistic update (``WHERE id = $1 AND version = $2``) and
writes one ``order_logs`` row.
"""

from __future__ import annotations

from typing import Any, cast

import asyncpg

from flashsale import coupons, inventory
from flashsale.errors import (
    AddressRequired,
    Forbidden,
    NotFound,
    NotPaidInFull,
)
from flashsale.flash import lifecycle as flash_lifecycle
from flashsale.orders.model import (
    SQL_ORDER,
    SYSTEM,
    Actor,
    invalid_transition,
    load_own,
    version_conflict,
    write_log,
)
from flashsale.stores.db import Conn

SQL_MERCHANT_OWNS_ALL = """
SELECT coalesce(bool_and(p.merchant_id = $2), false)
FROM order_items oi JOIN products p ON p.id = oi.product_id
WHERE oi.order_id = $1
"""
# $4: the status it leaves — pending_payment (a cancel, the timeout close) or paid (a refund
# before shipping).
SQL_TO_CANCELLED = """
UPDATE orders
SET status = 'cancelled', cancelled_at = now(), cancel_reason = $3, updated_at = now(),
    version = version + 1
WHERE id = $1 AND version = $2 AND status = $4
RETURNING version
"""
SQL_FLASH_CANCELLED = """
UPDATE orders
SET status = 'cancelled', cancelled_at = coalesce(cancelled_at, now()),
    cancel_reason = coalesce(cancel_reason, $2), updated_at = now(), version = version + 1
WHERE id = $1
RETURNING version
"""
SQL_CLOSE_PENDING_PAYMENTS = """
UPDATE pay_orders SET status = 'closed', updated_at = now()
WHERE order_id = $1 AND status = 'pending'
"""
SQL_TO_PAID = """
UPDATE orders SET status = 'paid', paid_at = now(), updated_at = now(), version = version + 1
WHERE id = $1 AND version = $2 AND status = 'pending_payment'
RETURNING version
"""
SQL_TO_SHIPPED = """
UPDATE orders
SET status = 'shipped', shipping_company = $3, tracking_number = $4, estimated_delivery = $5,
    shipped_at = now(), updated_at = now(), version = version + 1
WHERE id = $1 AND version = $2 AND status = 'paid'
RETURNING version
"""
SQL_TO_DELIVERED = """
UPDATE orders SET status = 'delivered', delivered_at = now(), updated_at = now(),
    version = version + 1
WHERE id = $1 AND version = $2 AND status = 'shipped'
RETURNING version
"""
SQL_TO_COMPLETED = """
UPDATE orders SET status = 'completed', completed_at = now(), updated_at = now(),
    version = version + 1
WHERE id = $1 AND version = $2 AND status IN ('shipped', 'delivered')
RETURNING version
"""
SQL_VERSION = "SELECT version FROM orders WHERE id = $1"
# Paid in full with nothing given back but what returns (of goods that came back) refunded:
# the one verified payment took the order's price, and every refund hangs off a return.
SQL_PAID_IN_FULL = """
SELECT EXISTS (SELECT 1 FROM pay_orders p
               WHERE p.order_id = o.id AND p.status = 'success' AND p.amount_cents = o.pay_cents)
   AND o.refunded_cents = (SELECT coalesce(sum(f.amount_cents), 0)
                           FROM order_returns r JOIN refunds f ON f.id = r.refund_id
                           WHERE r.order_id = o.id)
FROM orders o WHERE o.id = $1
"""
SQL_EXPIRED_UNPAID = """
SELECT id, version FROM orders
WHERE status = 'pending_payment' AND kind = 'regular' AND payment_deadline < now()
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""


def _check(
    order: asyncpg.Record, allowed: tuple[str, ...], action: str, expected_version: int | None
) -> int:
    if expected_version is not None and expected_version != order["version"]:
        raise version_conflict(order["id"])
    if order["status"] not in allowed:
        raise invalid_transition(order["status"], action)
    version: int = order["version"]
    return version


async def _apply(
    conn: Conn,
    sql: str,
    order: asyncpg.Record,
    version: int,
    to_status: str,
    actor: Actor,
    note: str | None,
    *args: Any,
) -> int:
    new_version: int | None = await conn.fetchval(sql, order["id"], version, *args)
    if new_version is None:
        raise version_conflict(order["id"])
    await write_log(conn, order["id"], actor, order["status"], to_status, note)
    return new_version


async def cancel_order(
    pool: asyncpg.Pool, order_id: str, actor: Actor, *, expected_version: int | None, reason: str
) -> dict[str, Any]:
    """pending_payment → cancelled; regular stock goes back, flash units go back to the sale."""
    async with pool.acquire() as proxy, proxy.transaction():
        conn = cast(asyncpg.Connection, proxy)  # the flash hook is typed for a Connection
        order = await load_own(conn, order_id, actor, lock=True)
        version = _check(order, ("pending_payment",), "cancel", expected_version)
        if order["kind"] == "flash":
            if not await flash_lifecycle.cancel_order(conn, order_id, reason=reason):
                raise invalid_transition(order["status"], "cancel")
            new_version = await conn.fetchval(SQL_FLASH_CANCELLED, order_id, reason)
            await write_log(conn, order_id, actor, order["status"], "cancelled", reason)
        else:
            new_version = await _apply(
                conn,
                SQL_TO_CANCELLED,
                order,
                version,
                "cancelled",
                actor,
                reason,
                reason,
                "pending_payment",
            )
            await inventory.release_for_order(conn, order_id, reason="cancelled")
            await coupons.release_for_order(conn, order_id)
        await conn.execute(SQL_CLOSE_PENDING_PAYMENTS, order_id)
    return {"order_id": order_id, "status": "cancelled", "version": new_version}


async def mark_paid(conn: Conn, order: asyncpg.Record, actor: Actor, note: str | None) -> int:
    """pending_payment → paid inside the caller's transaction (the order row is locked)."""
    version = _check(order, ("pending_payment",), "pay", None)
    new_version = await _apply(conn, SQL_TO_PAID, order, version, "paid", actor, note)
    if order["kind"] == "regular":
        await inventory.consume_for_order(conn, order["id"])
    return new_version


async def cancel_paid(
    conn: Conn, order: asyncpg.Record, actor: Actor, note: str, *, version: int
) -> int:
    """paid → cancelled inside the caller's transaction (the order row locked at
    ``version``, its money already given back): every unit goes back — regular stock to
    the shelf, flash units to their sale (through the sweeper, as for an unpaid cancel) —
    and so does the coupon."""
    if order["status"] != "paid":
        raise invalid_transition(order["status"], "cancel")
    if order["kind"] == "flash":
        if not await flash_lifecycle.cancel_order(
            conn, order["id"], reason=note, from_status="paid"
        ):
            raise invalid_transition(order["status"], "cancel")
        await write_log(conn, order["id"], actor, "paid", "cancelled", note)
        new_version: int = await conn.fetchval(SQL_VERSION, order["id"])
    else:
        new_version = await _apply(
            conn, SQL_TO_CANCELLED, order, version, "cancelled", actor, note, note, "paid"
        )
        await inventory.put_back_order(conn, order["id"], reason="refunded before shipping")
    await coupons.release_for_order(conn, order["id"])
    return new_version


async def _require_paid_in_full(conn: Conn, order: asyncpg.Record, action: str) -> None:
    """Goods leave (and an order completes) only for an order whose payment took its whole
    price and of which nothing went back but what returned goods were worth."""
    if not await conn.fetchval(SQL_PAID_IN_FULL, order["id"]):
        raise NotPaidInFull(
            f"cannot {action} an order that is not paid in full",
            data={
                "status": order["status"],
                "pay_amount": order["pay_cents"],
                "refunded_amount": order["refunded_cents"],
            },
        )


async def ship_order(
    pool: asyncpg.Pool,
    order_id: str,
    actor: Actor,
    *,
    expected_version: int | None,
    shipping_company: str,
    tracking_number: str,
    estimated_delivery: str | None,
) -> dict[str, Any]:
    """paid → shipped, by the merchant owning every product of the order, or an admin."""
    async with pool.acquire() as conn, conn.transaction():
        order, version = await _merchants_move(
            conn, order_id, actor, "paid", "ship", expected_version
        )
        if order["shipping_address"] is None:  # paying asks for one; an order may hold none anyway
            raise AddressRequired(
                "this order has no shipping address; it cannot ship",
                data={"order_id": order_id},
            )
        new_version = await _apply(
            conn,
            SQL_TO_SHIPPED,
            order,
            version,
            "shipped",
            actor,
            f"{shipping_company} {tracking_number}",
            shipping_company,
            tracking_number,
            estimated_delivery,
        )
    return {
        "order_id": order_id,
        "status": "shipped",
        "version": new_version,
        "shipping_company": shipping_company,
        "tracking_number": tracking_number,
        "estimated_delivery": estimated_delivery,
    }


async def _merchants_move(
    conn: Conn, order_id: str, actor: Actor, status: str, action: str, expected: int | None
) -> tuple[asyncpg.Record, int]:
    """The order and its version, for a move out of ``status`` that the merchant
    owning every product of it (or an admin) makes on a paid-in-full order."""
    order = await conn.fetchrow(SQL_ORDER, order_id)
    if order is None:
        raise NotFound("order not found")
    await require_merchant(conn, order_id, actor)
    version = _check(order, (status,), action, expected)
    await _require_paid_in_full(conn, order, action)
    return order, version


async def deliver_order(
    pool: asyncpg.Pool, order_id: str, actor: Actor, *, expected_version: int | None
) -> dict[str, Any]:
    """shipped → delivered (the carrier's event), by the merchant or an admin."""
    async with pool.acquire() as conn, conn.transaction():
        order, version = await _merchants_move(
            conn, order_id, actor, "shipped", "deliver", expected_version
        )
        new_version = await _apply(conn, SQL_TO_DELIVERED, order, version, "delivered", actor, None)
    return {"order_id": order_id, "status": "delivered", "version": new_version}


async def confirm_order(
    pool: asyncpg.Pool, order_id: str, actor: Actor, *, expected_version: int | None
) -> dict[str, Any]:
    """shipped/delivered → completed, by the buyer."""
    async with pool.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is None or order["user_id"] != actor.user_id:
            raise NotFound("order not found")
        version = _check(order, ("shipped", "delivered"), "confirm", expected_version)
        await _require_paid_in_full(conn, order, "confirm")
        new_version = await _apply(conn, SQL_TO_COMPLETED, order, version, "completed", actor, None)
    return {"order_id": order_id, "status": "completed", "version": new_version}


async def require_merchant(conn: Conn, order_id: str, actor: Actor) -> None:
    """The merchant of every product of the order, or an admin. Anyone else gets the
    same 404 as for a missing order, so order ids of other shops do not leak."""
    if actor.role == "admin":
        return
    if actor.role != "merchant":
        raise Forbidden("only the merchant of this order's products or an admin may do this")
    if not await conn.fetchval(SQL_MERCHANT_OWNS_ALL, order_id, actor.user_id):
        raise NotFound("order not found")


async def close_expired_orders(pool: asyncpg.Pool, *, batch: int = 100) -> int:
    """One sweep (seed 004 timeout close): cancel unpaid regular orders past their deadline
    and release their stock. Safe with many sweepers: locked rows are skipped and the
    cancel is a guarded update."""
    closed = 0
    async with pool.acquire() as conn, conn.transaction():
        for rec in await conn.fetch(SQL_EXPIRED_UNPAID, batch):
            version = await conn.fetchval(
                SQL_TO_CANCELLED, rec["id"], rec["version"], "payment timeout", "pending_payment"
            )
            if version is None:
                continue
            await write_log(
                conn, rec["id"], SYSTEM, "pending_payment", "cancelled", "payment timeout"
            )
            await inventory.release_for_order(conn, rec["id"], reason="timeout")
            await coupons.release_for_order(conn, rec["id"])
            await conn.execute(SQL_CLOSE_PENDING_PAYMENTS, rec["id"])
            closed += 1
    return closed
