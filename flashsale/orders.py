"""Orders: creation in undoable steps, the state machine, views.

``create_order`` is what ``POST /orders`` and ``POST /cart/checkout`` both call. It
follows seed 002's create-order design: validate → reserve stock → coupon → insert
order, items and pay order; each step commits on its own and registers its undo, and
a later failure runs the undos in reverse. If the process dies between steps, the
reservations still expire (their ``reserved_until`` is the payment deadline plus a
grace period) and the reservation sweeper gives the units back.

Every state change is an optimistic update (``WHERE id = $1 AND version = $2``) and
writes one ``order_logs`` row.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

import asyncpg
import orjson
from redis.asyncio import Redis

from flashsale import coupons, inventory
from flashsale.errors import (
    Forbidden,
    IdempotencyInProgress,
    InvalidTransition,
    NotFound,
    NotOnSale,
    PriceChanged,
    PurchaseLimitExceeded,
    SkuNotFound,
    ValidationFailed,
    VersionConflict,
)
from flashsale.flash import lifecycle as flash_lifecycle
from flashsale.flash import views as flash_views
from flashsale.ids import OrderIds
from flashsale.inventory import Conn
from flashsale.settings import Settings

log = logging.getLogger(__name__)

# Reservations outlive the payment deadline a little, so that the order sweeper (which
# cancels the order and releases them) runs first and the reservation sweeper is only
# the backstop for orders that never got written.
RESERVATION_GRACE_S: Final = 300
MAX_LINE_QUANTITY: Final = 999
SANDBOX_PAYMENT_METHOD: Final = "alipay"
SANDBOX_PROVIDER: Final = "sandbox"

STATUSES: Final = (
    "pending_payment",
    "paid",
    "shipped",
    "delivered",
    "completed",
    "cancelled",
    "refunded",
)
REFUNDABLE: Final = ("paid", "shipped", "delivered", "completed")


@dataclass(frozen=True, slots=True)
class OrderLineRequest:
    sku_id: int
    quantity: int
    expected_price_cents: int | None = None  # 409 PRICE_CHANGED if the price moved


@dataclass(frozen=True, slots=True)
class Actor:
    """Who changes an order: a user, a merchant, an admin or the system (sweepers)."""

    user_id: int | None
    role: str


SYSTEM: Final = Actor(None, "system")

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
SQL_LOG = """
INSERT INTO order_logs (order_id, actor_id, actor_role, from_status, to_status, note)
VALUES ($1, $2, $3, $4, $5, $6)
"""
ORDER_COLUMNS = """
id, user_id, kind, status, total_cents, discount_cents, shipping_cents, pay_cents,
refunded_cents, payment_deadline, shipping_address, version, created_at, updated_at, paid_at,
cancelled_at, cancel_reason, coupon_code, shipping_company, tracking_number,
estimated_delivery, shipped_at, delivered_at, completed_at
"""
SQL_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"  # noqa: S608
SQL_ORDER_FOR_UPDATE = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"  # noqa: S608
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
SQL_PENDING_PAYMENT = """
SELECT id, method, amount_cents, expires_at FROM pay_orders
WHERE order_id = $1 AND status = 'pending'
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
SQL_MERCHANT_OWNS_ALL = """
SELECT coalesce(bool_and(p.merchant_id = $2), false)
FROM order_items oi JOIN products p ON p.id = oi.product_id
WHERE oi.order_id = $1
"""
SQL_TO_CANCELLED = """
UPDATE orders
SET status = 'cancelled', cancelled_at = now(), cancel_reason = $3, updated_at = now(),
    version = version + 1
WHERE id = $1 AND version = $2 AND status = 'pending_payment'
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
SQL_EXPIRED_UNPAID = """
SELECT id, version FROM orders
WHERE status = 'pending_payment' AND kind = 'regular' AND payment_deadline < now()
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
SQL_LOGS = """
SELECT actor_id, actor_role, from_status, to_status, note, created_at
FROM order_logs WHERE order_id = $1 ORDER BY id
"""


def invalid_transition(status: str, action: str) -> InvalidTransition:
    return InvalidTransition(
        f"cannot {action} an order that is {status}",
        data={"status": status, "action": action},
    )


def version_conflict(order_id: str) -> VersionConflict:
    return VersionConflict(f"order {order_id} was changed by someone else; reload it and retry")


def new_payment_id() -> str:
    return "PAY" + secrets.token_hex(10).upper()


def payment_url(payment_id: str, settings: Settings) -> str | None:
    """Where the payer pays: the sandbox's page when it is the provider; else ``None`` —
    with no provider there is no page (its routes are not mounted), and the payment is
    started with ``POST /payment/create``."""
    if settings.payment_provider != SANDBOX_PROVIDER:
        return None
    return f"/api/v1/payment/sandbox/{payment_id}"


async def write_log(
    conn: Conn,
    order_id: str,
    actor: Actor,
    from_status: str | None,
    to_status: str,
    note: str | None = None,
) -> None:
    await conn.execute(SQL_LOG, order_id, actor.user_id, actor.role, from_status, to_status, note)


# --- creation ---------------------------------------------------------------------------


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
    "final_amount", "payment_id", "payment_url", "expires_at", "version"}``."""
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
                return await _replay(conn, existing, user_id, settings)
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
        "payment_url": payment_url(pid, settings),
        "expires_at": deadline,
        "version": 1,
        "idempotent_replay": False,
    }


async def _replay(
    conn: Conn, order_id: str | None, user_id: int, settings: Settings
) -> dict[str, Any]:
    order = None if order_id is None else await conn.fetchrow(SQL_ORDER, order_id)
    if order is None or order["user_id"] != user_id:
        raise IdempotencyInProgress(
            "an order with this Idempotency-Key is still being created; retry"
        )
    pay = await conn.fetchrow(SQL_PENDING_PAYMENT, order["id"])
    return {
        "order_id": order["id"],
        "status": order["status"],
        "total_amount": order["total_cents"],
        "discount_amount": order["discount_cents"],
        "shipping_fee": order["shipping_cents"],
        "final_amount": order["pay_cents"],
        "payment_id": None if pay is None else pay["id"],
        "payment_url": None if pay is None else payment_url(pay["id"], settings),
        "expires_at": order["payment_deadline"],
        "version": order["version"],
        "idempotent_replay": True,
    }


# --- views ------------------------------------------------------------------------------


def _item_view(r: asyncpg.Record) -> dict[str, Any]:
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


async def order_detail(conn: Conn, order: asyncpg.Record) -> dict[str, Any]:
    items = [_item_view(r) for r in await conn.fetch(SQL_ITEMS, order["id"])]
    pay = await conn.fetchrow(SQL_LATEST_PAYMENT, order["id"])
    address = order["shipping_address"] or {}
    return {
        "order_id": order["id"],
        "kind": order["kind"],
        "status": order["status"],
        "version": order["version"],
        "created_at": order["created_at"],
        "updated_at": order["updated_at"],
        "total_amount": order["total_cents"],
        "discount_amount": order["discount_cents"],
        "shipping_fee": order["shipping_cents"],
        "final_amount": order["pay_cents"],
        "refunded_amount": order["refunded_cents"],
        "coupon_code": order["coupon_code"],
        "payment_deadline": order["payment_deadline"],
        "cancelled_at": order["cancelled_at"],
        "cancel_reason": order["cancel_reason"],
        "completed_at": order["completed_at"],
        "items": items,
        "shipping_info": {
            "name": address.get("name"),
            "phone": address.get("phone"),
            "address": address.get("address"),
            "shipping_company": order["shipping_company"],
            "tracking_number": order["tracking_number"],
            "estimated_delivery": order["estimated_delivery"],
            "shipped_at": order["shipped_at"],
            "delivered_at": order["delivered_at"],
        },
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
    pool: asyncpg.Pool, redis: Redis, sale_ids: Iterable[int], order_id: str, user_id: int
) -> dict[str, Any]:
    """The caller's order (404 for anyone else's); a flash order still in flight too
    (looked up in the reservation logs of ``sale_ids``)."""
    async with pool.acquire() as conn:
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is not None:
            if order["user_id"] != user_id:
                raise NotFound("order not found")
            return await order_detail(conn, order)
    queued = await flash_views.queued_order(redis, sale_ids, order_id, user_id)
    if queued is None:
        raise NotFound("order not found")
    return queued


async def list_orders(
    pool: asyncpg.Pool, user_id: int, *, status: str | None, page: int, limit: int
) -> dict[str, Any]:
    rows = await pool.fetch(SQL_LIST, user_id, status, limit, (page - 1) * limit)
    total = rows[0]["total"] if rows else await pool.fetchval(SQL_COUNT, user_id, status)
    return {
        "orders": [
            {
                "order_id": r["id"],
                "kind": r["kind"],
                "status": r["status"],
                "total_amount": r["total_cents"],
                "discount_amount": r["discount_cents"],
                "shipping_fee": r["shipping_cents"],
                "final_amount": r["pay_cents"],
                "version": r["version"],
                "created_at": r["created_at"],
                "payment_deadline": r["payment_deadline"],
            }
            for r in rows
        ],
        "total": total,
        "page": page,
        "limit": limit,
    }


async def order_logs(pool: asyncpg.Pool, order_id: str, actor: Actor) -> list[dict[str, Any]]:
    """The operation log of the caller's order (any order for an admin)."""
    async with pool.acquire() as conn:
        await _load_own(conn, order_id, actor)
        return [dict(r) for r in await conn.fetch(SQL_LOGS, order_id)]


# --- state machine ----------------------------------------------------------------------


def _check(
    order: asyncpg.Record, allowed: tuple[str, ...], action: str, expected_version: int | None
) -> int:
    if expected_version is not None and expected_version != order["version"]:
        raise version_conflict(order["id"])
    if order["status"] not in allowed:
        raise invalid_transition(order["status"], action)
    version: int = order["version"]
    return version


async def _load_own(
    conn: Conn, order_id: str, actor: Actor, *, lock: bool = False
) -> asyncpg.Record:
    order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE if lock else SQL_ORDER, order_id)
    if order is None or (actor.role != "admin" and order["user_id"] != actor.user_id):
        raise NotFound("order not found")
    return order


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
        order = await _load_own(conn, order_id, actor, lock=True)
        version = _check(order, ("pending_payment",), "cancel", expected_version)
        if order["kind"] == "flash":
            if not await flash_lifecycle.cancel_order(conn, order_id, reason=reason):
                raise invalid_transition(order["status"], "cancel")
            new_version = await conn.fetchval(SQL_FLASH_CANCELLED, order_id, reason)
            await write_log(conn, order_id, actor, order["status"], "cancelled", reason)
        else:
            new_version = await _apply(
                conn, SQL_TO_CANCELLED, order, version, "cancelled", actor, reason, reason
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
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is None:
            raise NotFound("order not found")
        await _require_merchant(conn, order_id, actor)
        version = _check(order, ("paid",), "ship", expected_version)
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


async def deliver_order(
    pool: asyncpg.Pool, order_id: str, actor: Actor, *, expected_version: int | None
) -> dict[str, Any]:
    """shipped → delivered (the carrier's event), by the merchant or an admin."""
    async with pool.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is None:
            raise NotFound("order not found")
        await _require_merchant(conn, order_id, actor)
        version = _check(order, ("shipped",), "deliver", expected_version)
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
        new_version = await _apply(conn, SQL_TO_COMPLETED, order, version, "completed", actor, None)
    return {"order_id": order_id, "status": "completed", "version": new_version}


async def _require_merchant(conn: Conn, order_id: str, actor: Actor) -> None:
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
                SQL_TO_CANCELLED, rec["id"], rec["version"], "payment timeout"
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
