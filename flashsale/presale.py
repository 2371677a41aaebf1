"""Presale (seed 001): campaigns that sell a SKU before release, and presale orders.

A campaign has its own stock: ``available = total - preoccupied``, where ``preoccupied``
is the sum of the quantities of its non-cancelled orders. Pre-occupying is one
conditional UPDATE (``total - preoccupied >= qty``) in the transaction that inserts the
order; a cancel is one statement that flips the order to ``cancelled`` only if it is
still cancellable and gives its units back, so two cancels return the stock once.

Lifecycle: pending -> paid -> shipped -> completed, and pending/paid -> cancelled. A paid
order is paid through the payment path only (:func:`mark_paid`); cancelling it refunds what
was paid in the same transaction that gives its units back, so units never return without
the money and the money never returns twice.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from flashsale.auth import Principal
from flashsale.errors import (
    Forbidden,
    InsufficientStock,
    InvalidTransition,
    NotFound,
    PaymentRequired,
    PresaleNotActive,
    PresaleNotFound,
    PresaleOrderExpired,
    PurchaseLimitExceeded,
    ValidationFailed,
    VersionConflict,
)
from flashsale.paging import offset, page_of
from flashsale.stores.db import Conn

log = logging.getLogger(__name__)

STATUSES: Final = ("pending", "paid", "shipped", "completed", "cancelled")
TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    "pending": ("paid", "cancelled"),
    "paid": ("shipped", "cancelled"),
    "shipped": ("completed",),
}
# Which statuses each party may move an order to (an admin may do all but ``paid``).
BUYER_MAY: Final = frozenset({"cancelled", "completed"})
SELLER_MAY: Final = frozenset({"shipped", "cancelled"})
# Only a verified payment moves an order to paid (:func:`mark_paid`), never a request.
PAID_BY_PAYMENT_ONLY: Final = frozenset({"paid"})


def sources_of(target: str) -> list[str]:
    """The statuses from which ``target`` can be reached."""
    return [src for src, targets in TRANSITIONS.items() if target in targets]


# --- campaigns ---------------------------------------------------------------------------

SQL_SKU_OWNER: Final = """
SELECT p.merchant_id, p.id AS product_id FROM skus s JOIN products p ON p.id = s.product_id
WHERE s.id = $1
"""
SQL_INSERT_CAMPAIGN: Final = """
INSERT INTO presale_campaigns (product_id, sku_id, price_cents, total, starts_at, ends_at,
                               created_by)
SELECT s.product_id, s.id, coalesce($2, s.price_cents), $3, coalesce($4, now()), $5, $6
FROM skus s WHERE s.id = $1
RETURNING *
"""
SQL_CAMPAIGN: Final = "SELECT * FROM presale_campaigns WHERE id = $1"


def campaign_out(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "product_id": r["product_id"],
        "sku_id": r["sku_id"],
        "price": r["price_cents"],
        "total": r["total"],
        "preoccupied": r["preoccupied"],
        "available": r["total"] - r["preoccupied"],
        "starts_at": r["starts_at"].isoformat(),
        "ends_at": r["ends_at"].isoformat(),
    }


async def create_campaign(
    pool: asyncpg.Pool,
    principal: Principal,
    *,
    sku_id: int,
    total: int,
    price_cents: int | None,
    starts_at: datetime | None,
    ends_at: datetime,
) -> dict[str, Any]:
    """Open a presale of ``total`` units of a SKU (the product's merchant or an admin)."""
    if principal.role not in ("merchant", "admin"):
        raise Forbidden("requires role: merchant or admin")
    if starts_at is not None and starts_at >= ends_at:
        raise ValidationFailed(fields={"ends_at": "must be after starts_at"})
    owner = await pool.fetchrow(SQL_SKU_OWNER, sku_id)
    if owner is None:
        raise ValidationFailed(fields={"sku_id": "unknown SKU"})
    if principal.role != "admin" and owner["merchant_id"] != principal.user_id:
        raise Forbidden("this product belongs to another merchant")
    try:
        row = await pool.fetchrow(
            SQL_INSERT_CAMPAIGN, sku_id, price_cents, total, starts_at, ends_at, principal.user_id
        )
    except asyncpg.CheckViolationError:
        raise ValidationFailed(fields={"ends_at": "must be after starts_at"}) from None
    assert row is not None
    return campaign_out(row)


async def get_campaign(pool: asyncpg.Pool, campaign_id: int) -> dict[str, Any]:
    row = await pool.fetchrow(SQL_CAMPAIGN, campaign_id)
    if row is None:
        raise PresaleNotFound("presale not found")
    return campaign_out(row)


# --- orders ------------------------------------------------------------------------------

# The open campaign for the product (and SKU, if given) gives up `qty` units, or nothing.
SQL_PREOCCUPY: Final = """
UPDATE presale_campaigns SET preoccupied = preoccupied + $3, updated_at = now()
WHERE id = (
    SELECT id FROM presale_campaigns
    WHERE product_id = $1 AND ($2::bigint IS NULL OR sku_id = $2::bigint)
      AND starts_at <= now() AND ends_at > now()
    ORDER BY id LIMIT 1
) AND total - preoccupied >= $3
RETURNING id, sku_id, price_cents
"""
# Only to explain a refused pre-occupation.
SQL_CAMPAIGN_STATE: Final = """
SELECT total - preoccupied AS available, (starts_at <= now() AND ends_at > now()) AS open
FROM presale_campaigns
WHERE product_id = $1 AND ($2::bigint IS NULL OR sku_id = $2::bigint)
ORDER BY (starts_at <= now() AND ends_at > now()) DESC, id
LIMIT 1
"""
SQL_INSERT_ORDER: Final = """
INSERT INTO presale_orders (id, campaign_id, user_id, product_id, sku_id, quantity,
                            price_cents, total_cents, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
RETURNING *
"""
# The per-user cap (products.max_per_user, else the setting) counts units held unpaid.
SQL_LOCK_BUYER: Final = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE"
SQL_BUYER_HOLDS: Final = """
SELECT p.max_per_user,
       (SELECT coalesce(sum(o.quantity), 0) FROM presale_orders o
        WHERE o.user_id = $2 AND o.product_id = p.id AND o.status = 'pending') AS held
FROM products p WHERE p.id = $1
"""
SQL_MARK_PAID: Final = """
UPDATE presale_orders SET status = 'paid', version = version + 1, updated_at = now(),
    paid_at = now()
WHERE id = $1 AND status = 'pending' AND expires_at > now()
RETURNING id
"""
# The payment path locks the presale order first, then its pay orders (as for orders).
SQL_LOCK_FOR_PAYMENT: Final = """
SELECT id, user_id, status, total_cents, version, expires_at,
       coalesce(expires_at <= now(), false) AS expired
FROM presale_orders WHERE id = $1 FOR UPDATE
"""
SQL_CLOSE_PENDING_PAYS: Final = """
UPDATE pay_orders SET status = 'closed', updated_at = now()
WHERE presale_order_id = $1 AND status = 'pending'
"""
SQL_EXPIRED: Final = """
SELECT id FROM presale_orders
WHERE status = 'pending' AND expires_at < now()
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
SQL_ORDER: Final = """
SELECT o.*, p.merchant_id FROM presale_orders o JOIN products p ON p.id = o.product_id
WHERE o.id = $1
"""
SQL_TRANSITION: Final = """
UPDATE presale_orders SET
    status = $2, version = version + 1, updated_at = now(),
    paid_at = CASE WHEN $2 = 'paid' THEN now() ELSE paid_at END
WHERE id = $1 AND status = ANY($3::text[]) AND ($4::integer IS NULL OR version = $4::integer)
RETURNING *
"""
# Cancel and give the units back in one statement: the order row lock makes a second,
# concurrent cancel see 'cancelled' and match nothing.
SQL_CANCEL: Final = """
WITH o AS (
    UPDATE presale_orders SET
        status = 'cancelled', version = version + 1, updated_at = now(), cancelled_at = now()
    WHERE id = $1 AND status = ANY($2::text[]) AND ($3::integer IS NULL OR version = $3::integer)
    RETURNING campaign_id, quantity
)
UPDATE presale_campaigns c SET preoccupied = c.preoccupied - o.quantity, updated_at = now()
FROM o WHERE c.id = o.campaign_id
RETURNING c.id
"""
SQL_LOCK_ORDER: Final = "SELECT status FROM presale_orders WHERE id = $1 FOR UPDATE"
SQL_SUCCESS_PAY: Final = """
SELECT id, amount_cents FROM pay_orders
WHERE presale_order_id = $1 AND status = 'success'
FOR UPDATE
"""
SQL_INSERT_REFUND: Final = """
INSERT INTO refunds (id, presale_order_id, pay_order_id, amount_cents, reason, status,
                     requested_by, completed_at)
VALUES ($1, $2, $3, $4, $5, 'completed', $6, now())
"""
SQL_SET_REFUNDED: Final = "UPDATE presale_orders SET refunded_cents = $2 WHERE id = $1"
SQL_LIST: Final = """
SELECT * FROM presale_orders
WHERE ($1::bigint IS NULL OR user_id = $1::bigint)
  AND ($2::timestamptz IS NULL OR created_at >= $2::timestamptz)
  AND ($3::timestamptz IS NULL OR created_at < $3::timestamptz)
ORDER BY created_at DESC, id DESC
LIMIT $4 OFFSET $5
"""
SQL_COUNT: Final = """
SELECT count(*) FROM presale_orders
WHERE ($1::bigint IS NULL OR user_id = $1::bigint)
  AND ($2::timestamptz IS NULL OR created_at >= $2::timestamptz)
  AND ($3::timestamptz IS NULL OR created_at < $3::timestamptz)
"""


def order_out(r: asyncpg.Record) -> dict[str, Any]:
    def iso(v: datetime | None) -> str | None:
        return None if v is None else v.isoformat()

    return {
        "order_id": r["id"],
        "presale_id": r["campaign_id"],
        "user_id": r["user_id"],
        "product_id": r["product_id"],
        "sku_id": r["sku_id"],
        "quantity": r["quantity"],
        "price": r["price_cents"],
        "total_amount": r["total_cents"],
        "status": r["status"],
        "refunded_amount": r["refunded_cents"],
        "version": r["version"],
        "created_at": iso(r["created_at"]),
        "updated_at": iso(r["updated_at"]),
        "paid_at": iso(r["paid_at"]),
        "cancelled_at": iso(r["cancelled_at"]),
        "expires_at": iso(r["expires_at"]) if r["status"] == "pending" else None,
    }


async def create_order(
    pool: asyncpg.Pool,
    *,
    order_id: str,
    user_id: int,
    product_id: int,
    sku_id: int | None,
    quantity: int,
    hold_s: int,
    max_per_user_default: int,
) -> dict[str, Any]:
    """Pre-occupy ``quantity`` units of the product's open presale and record the order.
    The units are held ``hold_s`` seconds: unpaid by then, the sweeper cancels the order
    (:func:`cancel_expired`). One buyer holds at most the product's ``max_per_user``
    (else ``max_per_user_default``) units unpaid."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL_LOCK_BUYER, user_id)
        holds = await conn.fetchrow(SQL_BUYER_HOLDS, product_id, user_id)
        if holds is None:
            raise PresaleNotFound
        limit = holds["max_per_user"] or max_per_user_default
        if holds["held"] + quantity > limit:
            raise PurchaseLimitExceeded(
                data={"product_id": product_id, "limit": limit, "held": holds["held"]}
            )
        taken = await conn.fetchrow(SQL_PREOCCUPY, product_id, sku_id, quantity)
        if taken is None:
            state = await conn.fetchrow(SQL_CAMPAIGN_STATE, product_id, sku_id)
            if state is None:
                raise PresaleNotFound
            if not state["open"]:
                raise PresaleNotActive
            raise InsufficientStock(
                "not enough presale stock", data={"available": state["available"]}
            )
        row = await conn.fetchrow(
            SQL_INSERT_ORDER,
            order_id,
            taken["id"],
            user_id,
            product_id,
            taken["sku_id"],
            quantity,
            taken["price_cents"],
            taken["price_cents"] * quantity,
            float(hold_s),
        )
    assert row is not None
    return order_out(row)


def _can_see(principal: Principal, order: asyncpg.Record) -> bool:
    return (
        principal.role == "admin"
        or order["user_id"] == principal.user_id
        or (principal.role == "merchant" and order["merchant_id"] == principal.user_id)
    )


async def get_order(pool: asyncpg.Pool, principal: Principal, order_id: str) -> dict[str, Any]:
    """The order if the caller may see it (buyer, the product's merchant, admin); else 404."""
    return order_out(await _visible(pool, principal, order_id))


async def _visible(pool: asyncpg.Pool, principal: Principal, order_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(SQL_ORDER, order_id)
    if row is None or not _can_see(principal, row):
        raise NotFound("presale order not found")
    return row


def _check_allowed(principal: Principal, order: asyncpg.Record, target: str) -> None:
    if target in PAID_BY_PAYMENT_ONLY:
        raise PaymentRequired
    if principal.role == "admin":
        return
    allowed: set[str] = set()
    if order["user_id"] == principal.user_id:
        allowed |= BUYER_MAY
    if principal.role == "merchant" and order["merchant_id"] == principal.user_id:
        allowed |= SELLER_MAY
    if target not in allowed:
        raise Forbidden(f"you may not move this order to {target}")


async def _explain_refusal(
    pool: asyncpg.Pool, order_id: str, target: str, version: int | None
) -> asyncpg.Record:
    row = await pool.fetchrow(SQL_ORDER, order_id)
    assert row is not None  # orders are never deleted
    if (
        target in TRANSITIONS.get(row["status"], ())
        and version is not None
        and version != row["version"]
    ):
        raise VersionConflict(data={"version": row["version"]})
    if target == "cancelled" and row["status"] == "cancelled":
        return row
    raise InvalidTransition(
        f"cannot go from {row['status']} to {target}", data={"status": row["status"]}
    )


async def cancel_order(
    pool: asyncpg.Pool, principal: Principal, order_id: str, *, version: int | None = None
) -> tuple[dict[str, Any], bool]:
    """Cancel and return the units to the campaign; ``(order, changed)``. A paid order is
    refunded in full in the same transaction.

    Cancelling an order that is already cancelled changes nothing and is not an error.
    """
    order = await _visible(pool, principal, order_id)
    _check_allowed(principal, order, "cancelled")
    async with pool.acquire() as conn, conn.transaction():
        # The order row first, then its pay orders (the payment path's lock order).
        before = await conn.fetchval(SQL_LOCK_ORDER, order_id)
        done = await conn.fetchval(SQL_CANCEL, order_id, sources_of("cancelled"), version)
        if done is not None:
            if before == "paid":
                await _refund_in_full(conn, order_id, principal)
            await conn.execute(SQL_CLOSE_PENDING_PAYS, order_id)
    if done is None:
        return order_out(await _explain_refusal(pool, order_id, "cancelled", version)), False
    return await get_order(pool, principal, order_id), True


async def _refund_in_full(conn: Conn, order_id: str, principal: Principal) -> None:
    """Give back what the verified payment of a paid order took (inside the cancel)."""
    pay = await conn.fetchrow(SQL_SUCCESS_PAY, order_id)
    if pay is None:
        # Marked paid with no verified payment behind it (the payment flow never does so,
        # but a row may say it): no money was taken, so there is nothing to give back.
        log.warning("presale order %s was paid without a payment; cancelled, no refund", order_id)
        return
    await conn.execute(
        SQL_INSERT_REFUND,
        "REF" + secrets.token_hex(10).upper(),  # the form of payments.new_refund_id
        order_id,
        pay["id"],
        pay["amount_cents"],
        f"presale order cancelled by {principal.role}",
        principal.user_id,
    )
    await conn.execute(SQL_SET_REFUNDED, order_id, pay["amount_cents"])


async def change_status(
    pool: asyncpg.Pool,
    principal: Principal,
    order_id: str,
    target: str,
    *,
    version: int | None = None,
) -> dict[str, Any]:
    """Move an order along its lifecycle; 409 INVALID_TRANSITION or VERSION_CONFLICT."""
    if target == "cancelled":
        out, _ = await cancel_order(pool, principal, order_id, version=version)
        return out
    order = await _visible(pool, principal, order_id)
    _check_allowed(principal, order, target)
    row = await pool.fetchrow(SQL_TRANSITION, order_id, target, sources_of(target), version)
    if row is None:
        await _explain_refusal(pool, order_id, target, version)
        raise InvalidTransition  # unreachable: _explain_refusal raises for non-cancel targets
    return order_out(row)


async def lock_for_payment(conn: Conn, order_id: str) -> asyncpg.Record | None:
    """The presale order, locked for the payment path (``None`` if there is none)."""
    row: asyncpg.Record | None = await conn.fetchrow(SQL_LOCK_FOR_PAYMENT, order_id)
    return row


def check_payable(order: asyncpg.Record) -> None:
    """409 unless a payment may be started for ``order`` (pending, hold not expired)."""
    if order["status"] != "pending":
        raise InvalidTransition(
            f"cannot pay an order that is {order['status']}",
            data={"status": order["status"], "action": "pay"},
        )
    if order["expired"]:
        raise PresaleOrderExpired(data={"expires_at": order["expires_at"].isoformat()})


async def mark_paid(conn: Conn, order_id: str) -> bool:
    """pending -> paid, for the payment path only (after the provider's verified
    notification); False if the order is not pending (cancelled, expired, already paid)."""
    return await conn.fetchval(SQL_MARK_PAID, order_id) is not None


async def cancel_expired(pool: asyncpg.Pool, *, batch: int = 100) -> int:
    """One sweep: cancel pending presale orders past ``expires_at`` and give their units
    back to the campaign. Safe with many sweepers: locked rows are skipped and the
    cancel is status-guarded, so units go back exactly once."""
    cancelled = 0
    async with pool.acquire() as conn, conn.transaction():
        for rec in await conn.fetch(SQL_EXPIRED, batch):
            if await conn.fetchval(SQL_CANCEL, rec["id"], ["pending"], None) is not None:
                await conn.execute(SQL_CLOSE_PENDING_PAYS, rec["id"])
                cancelled += 1
    return cancelled


@dataclass(frozen=True, slots=True)
class OrderFilter:
    user_id: int | None
    since: datetime | None
    until: datetime | None
    page: int
    limit: int


async def list_orders(pool: asyncpg.Pool, f: OrderFilter) -> dict[str, Any]:
    args = (f.user_id, f.since, f.until)
    async with pool.acquire() as conn:
        rows = await conn.fetch(SQL_LIST, *args, f.limit, offset(f.page, f.limit))
        total = await conn.fetchval(SQL_COUNT, *args)
    return page_of("orders", [order_out(r) for r in rows], total=total, page=f.page, limit=f.limit)
