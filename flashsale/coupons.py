"""Coupons and the price of an order.

``flashsale.orders.create_order`` calls :func:`quote` to price the lines
and :func:`redeem`/:func:`unredeem` as its coupon step and that step's undo.

A coupon is a template with a public code: within its window [starts_at, ends_at)
any user may use it up to ``max_uses_per_user`` times, and all users together up
to ``total_quantity`` times. Its ``min_amount`` and its discount apply to the
subtotal of the lines in its scope (all / categories with their descendants /
products), measured before promotions. Promotions and the coupon stack; the total
discount never exceeds the subtotal.

Only :func:`redeem` consumes a use, always tied to an order; ``POST /coupons/use``
and :func:`quote` only evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from flashsale import promotions
from flashsale.errors import (
    CouponExists,
    CouponLimitReached,
    CouponNotApplicable,
    CouponNotFound,
    CouponSoldOut,
)
from flashsale.stores.db import Conn

# Shipping: one place for the rule. Free when the subtotal reaches the threshold
# (before discounts) or with a free_shipping coupon; otherwise a flat fee.
SHIPPING_FEE_CENTS: Final = 1_000
FREE_SHIPPING_MIN_CENTS: Final = 9_900
AVAILABLE_LIMIT: Final = 200

COUPON_TYPES: Final = ("amount_off", "percent_off", "free_shipping")
COUPON_SCOPES: Final = ("all", "categories", "products")

# A coupon with how often user $2 has used it.
_SQL_COUPON_OF_USER = """
SELECT c.id, c.code, c.name, c.type, c.amount_off_cents, c.percent_off,
    c.max_discount_cents, c.min_amount_cents, c.scope, c.category_ids, c.product_ids,
    c.starts_at, c.ends_at, c.max_uses_per_user, c.total_quantity, c.used_count,
    COALESCE(u.used, 0) AS user_used
FROM coupons c LEFT JOIN coupon_user_counts u ON u.coupon_id = c.id AND u.user_id = $2
"""
SQL_COUPON_BY_CODE = _SQL_COUPON_OF_USER + "WHERE c.code = $1"
SQL_AVAILABLE = (
    _SQL_COUPON_OF_USER
    + """WHERE c.starts_at <= $1 AND c.ends_at > $1
  AND (c.total_quantity IS NULL OR c.used_count < c.total_quantity)
  AND COALESCE(u.used, 0) < c.max_uses_per_user
ORDER BY c.id
LIMIT $3
"""
)
SQL_INSERT_COUPON = """
INSERT INTO coupons AS c (code, name, type, amount_off_cents, percent_off, max_discount_cents,
    min_amount_cents, scope, category_ids, product_ids, starts_at, ends_at, max_uses_per_user,
    total_quantity)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
RETURNING c.id, c.code, c.name, c.type, c.amount_off_cents, c.percent_off,
    c.max_discount_cents, c.min_amount_cents, c.scope, c.category_ids, c.product_ids,
    c.starts_at, c.ends_at, c.max_uses_per_user, c.total_quantity, c.used_count, 0 AS user_used
"""
# The per-user limit: one statement that counts a use only while under the limit.
SQL_COUNT_USER_USE = """
INSERT INTO coupon_user_counts AS u (coupon_id, user_id, used) VALUES ($1, $2, 1)
ON CONFLICT (coupon_id, user_id) DO UPDATE SET used = u.used + 1 WHERE u.used < $3
RETURNING used
"""
SQL_COUNT_TOTAL_USE = """
UPDATE coupons SET used_count = used_count + 1
WHERE id = $1 AND (total_quantity IS NULL OR used_count < total_quantity)
RETURNING used_count
"""
SQL_INSERT_USE = """
INSERT INTO coupon_uses (coupon_id, user_id, order_id, discount_cents) VALUES ($1, $2, $3, $4)
RETURNING id
"""
SQL_RELEASE_USE = """
UPDATE coupon_uses SET status = 'released', released_at = now()
WHERE id = $1 AND status = 'used'
RETURNING coupon_id, user_id
"""
SQL_RELEASE_ORDER_USE = """
UPDATE coupon_uses SET status = 'released', released_at = now()
WHERE order_id = $1 AND status = 'used'
RETURNING coupon_id, user_id
"""
SQL_UNCOUNT_USER_USE = """
UPDATE coupon_user_counts SET used = used - 1 WHERE coupon_id = $1 AND user_id = $2 AND used > 0
"""
SQL_UNCOUNT_TOTAL_USE = """
UPDATE coupons SET used_count = used_count - 1 WHERE id = $1 AND used_count > 0
"""


@dataclass(frozen=True, slots=True)
class PricedLine:
    product_id: int
    sku_id: int
    category_id: int | None
    quantity: int
    unit_price_cents: int

    @property
    def subtotal_cents(self) -> int:
        return self.unit_price_cents * self.quantity


@dataclass(frozen=True, slots=True)
class Quote:
    subtotal_cents: int
    shipping_cents: int
    discount_cents: int
    total_cents: int
    coupon_code: str | None
    promotions: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class CouponApplication:
    coupon_use_id: int | None
    code: str | None
    discount_cents: int
    free_shipping: bool


@dataclass(frozen=True, slots=True)
class Assessment:
    applicable: bool
    reason: str | None
    discount_cents: int
    free_shipping: bool


def normalize_code(code: str) -> str:
    return code.strip().upper()


def run_out(coupon: asyncpg.Record | dict[str, Any]) -> bool:
    return coupon["total_quantity"] is not None and coupon["used_count"] >= coupon["total_quantity"]


def assess(
    coupon: asyncpg.Record | dict[str, Any], *, eligible_cents: int, now: datetime, user_used: int
) -> Assessment:
    """Whether ``coupon`` applies to ``eligible_cents`` of in-scope goods at ``now``."""
    reason: str | None = None
    if now < coupon["starts_at"]:
        reason = "the coupon is not valid yet"
    elif now >= coupon["ends_at"]:
        reason = "the coupon has expired"
    elif run_out(coupon):
        reason = "the coupon has run out"
    elif user_used >= coupon["max_uses_per_user"]:
        reason = "usage limit reached"
    elif eligible_cents <= 0:
        reason = "no item in the order is covered by the coupon"
    elif eligible_cents < coupon["min_amount_cents"]:
        reason = f"requires a minimum amount of {coupon['min_amount_cents']}"
    if reason is not None:
        return Assessment(False, reason, 0, False)
    kind = coupon["type"]
    if kind == "amount_off":
        discount = min(int(coupon["amount_off_cents"]), eligible_cents)
    elif kind == "percent_off":
        discount = eligible_cents * int(coupon["percent_off"]) // 100
        if coupon["max_discount_cents"] is not None:
            discount = min(discount, int(coupon["max_discount_cents"]))
    else:
        discount = 0
    return Assessment(True, None, discount, kind == "free_shipping")


async def _eligible_cents(conn: Conn, coupon: asyncpg.Record, lines: Sequence[PricedLine]) -> int:
    scope = coupon["scope"]
    if scope == "all":
        return sum(line.subtotal_cents for line in lines)
    if scope == "products":
        products = set(coupon["product_ids"])
        return sum(line.subtotal_cents for line in lines if line.product_id in products)
    closure = await promotions.category_closure(conn, coupon["category_ids"])
    return sum(line.subtotal_cents for line in lines if line.category_id in closure)


async def _load(conn: Conn, code: str, user_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(SQL_COUPON_BY_CODE, normalize_code(code), user_id)
    if row is None:
        raise CouponNotApplicable("unknown coupon", fields={"coupon_code": "unknown coupon"})
    return row


def shipping_fee(subtotal_cents: int, *, has_lines: bool, free_shipping: bool) -> int:
    if not has_lines or free_shipping or subtotal_cents >= FREE_SHIPPING_MIN_CENTS:
        return 0
    return SHIPPING_FEE_CENTS


async def best_promotions(
    conn: Conn, lines: Sequence[PricedLine], now: datetime
) -> list[promotions.AppliedPromotion]:
    items = [
        promotions.CalcItem(i, line.category_id, line.subtotal_cents)
        for i, line in enumerate(lines)
    ]
    return await promotions.discount_for(conn, items, now)


async def quote(
    conn: asyncpg.Connection, *, user_id: int, lines: list[PricedLine], coupon_code: str | None
) -> Quote:
    """Subtotal, shipping, the best promotion and coupon discount, and the total.

    Raises :class:`CouponNotApplicable` (422, field ``coupon_code``) for a coupon
    that is unknown or does not apply.
    """
    now = datetime.now(UTC)
    subtotal = sum(line.subtotal_cents for line in lines)
    applied = await best_promotions(conn, lines, now)
    promo_discount = sum(a.discount_cents for a in applied)
    coupon_discount, free_shipping, code = 0, False, None
    if coupon_code:
        coupon = await _load(conn, coupon_code, user_id)
        verdict = assess(
            coupon,
            eligible_cents=await _eligible_cents(conn, coupon, lines),
            now=now,
            user_used=coupon["user_used"],
        )
        if not verdict.applicable:
            raise CouponNotApplicable(verdict.reason, fields={"coupon_code": str(verdict.reason)})
        coupon_discount, free_shipping, code = (
            verdict.discount_cents,
            verdict.free_shipping,
            coupon["code"],
        )
    discount = min(promo_discount + coupon_discount, subtotal)
    shipping = shipping_fee(subtotal, has_lines=bool(lines), free_shipping=free_shipping)
    return Quote(
        subtotal,
        shipping,
        discount,
        subtotal - discount + shipping,
        code,
        tuple(a.public() for a in applied),
    )


async def redeem(
    conn: asyncpg.Connection,
    *,
    user_id: int,
    code: str | None,
    lines: list[PricedLine],
    order_id: str,
) -> CouponApplication:
    """Record the use of a coupon for an order (raises ValidationFailed/Conflict if it cannot
    apply).

    The per-user and total limits are each one conditional statement, so concurrent
    redemptions never exceed them; the three writes run in one (nested) transaction.
    """
    if not code:
        return CouponApplication(None, None, 0, False)
    coupon = await _load(conn, code, user_id)
    verdict = assess(
        coupon,
        eligible_cents=await _eligible_cents(conn, coupon, lines),
        now=datetime.now(UTC),
        user_used=0,
    )
    if not verdict.applicable:
        if run_out(coupon):  # one answer whether the read or the conditional update saw it
            raise CouponSoldOut
        raise CouponNotApplicable(verdict.reason, fields={"coupon_code": str(verdict.reason)})
    async with conn.transaction():
        if (
            await conn.fetchval(
                SQL_COUNT_USER_USE, coupon["id"], user_id, coupon["max_uses_per_user"]
            )
            is None
        ):
            raise CouponLimitReached
        if await conn.fetchval(SQL_COUNT_TOTAL_USE, coupon["id"]) is None:
            raise CouponSoldOut
        use_id: int = await conn.fetchval(
            SQL_INSERT_USE, coupon["id"], user_id, order_id, verdict.discount_cents
        )
    return CouponApplication(use_id, coupon["code"], verdict.discount_cents, verdict.free_shipping)


async def unredeem(conn: asyncpg.Connection, coupon_use_id: int) -> None:
    """Undo :func:`redeem` (the order failed after the coupon step); a second call is a no-op."""
    async with conn.transaction():
        row = await conn.fetchrow(SQL_RELEASE_USE, coupon_use_id)
        if row is not None:
            await _uncount(conn, row)


async def release_for_order(conn: Conn, order_id: str) -> bool:
    """Give back the coupon use of an order that will never be paid (cancelled, timed
    out). Exactly once: the use flips from ``used`` to ``released`` in one guarded
    statement, so a second call (or a concurrent one) changes nothing. Call inside the
    transaction that cancels the order."""
    row = await conn.fetchrow(SQL_RELEASE_ORDER_USE, order_id)
    if row is None:
        return False
    await _uncount(conn, row)
    return True


async def _uncount(conn: Conn, use: asyncpg.Record) -> None:
    await conn.execute(SQL_UNCOUNT_USER_USE, use["coupon_id"], use["user_id"])
    await conn.execute(SQL_UNCOUNT_TOTAL_USE, use["coupon_id"])


def public(coupon: asyncpg.Record | dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """A coupon as ``GET /coupons/available`` shows it (money in cents)."""
    discount: dict[str, Any]
    if coupon["type"] == "amount_off":
        discount = {"amount": coupon["amount_off_cents"]}
    elif coupon["type"] == "percent_off":
        discount = {"percent": coupon["percent_off"], "max_amount": coupon["max_discount_cents"]}
    else:
        discount = {"free_shipping": True}
    return {
        "coupon_id": coupon["id"],
        "code": coupon["code"],
        "name": coupon["name"],
        "type": coupon["type"],
        "condition": {"min_amount": coupon["min_amount_cents"]},
        "discount": discount,
        "scope": coupon["scope"],
        "valid_from": coupon["starts_at"].isoformat(),
        "valid_until": coupon["ends_at"].isoformat(),
        "applicable_categories": [names[c] for c in coupon["category_ids"] if c in names],
        "category_ids": list(coupon["category_ids"]),
        "product_ids": list(coupon["product_ids"]),
        "remaining_uses": coupon["max_uses_per_user"] - coupon["user_used"],
    }


async def available(
    conn: Conn, *, user_id: int, amount_cents: int | None = None
) -> list[dict[str, Any]]:
    """Coupons the user can still use now; with ``amount_cents``, whether each applies to it
    (scoped coupons are judged as if the whole amount were in scope)."""
    now = datetime.now(UTC)
    rows = await conn.fetch(SQL_AVAILABLE, now, user_id, AVAILABLE_LIMIT)
    names = await promotions.category_names(
        conn, sorted({c for r in rows for c in r["category_ids"]})
    )
    out = []
    for r in rows:
        item = public(r, names)
        if amount_cents is not None:
            verdict = assess(r, eligible_cents=amount_cents, now=now, user_used=r["user_used"])
            item |= {
                "applicable": verdict.applicable,
                "discount_amount": verdict.discount_cents,
                "reason": verdict.reason,
            }
        out.append(item)
    return out


async def available_for_lines(
    conn: Conn, *, user_id: int, lines: Sequence[PricedLine]
) -> list[dict[str, Any]]:
    """``available_coupons`` of the checkout preview: {code, name, applicable, discount_amount}."""
    now = datetime.now(UTC)
    out = []
    for r in await conn.fetch(SQL_AVAILABLE, now, user_id, AVAILABLE_LIMIT):
        verdict = assess(
            r,
            eligible_cents=await _eligible_cents(conn, r, lines),
            now=now,
            user_used=r["user_used"],
        )
        out.append(
            {
                "code": r["code"],
                "name": r["name"],
                "applicable": verdict.applicable,
                "discount_amount": verdict.discount_cents,
                "reason": verdict.reason,
            }
        )
    return out


async def check_use(
    conn: Conn,
    *,
    user_id: int,
    code: str,
    order_amount_cents: int,
    categories: Sequence[int | str],
    product_ids: Sequence[int],
) -> dict[str, Any]:
    """``POST /coupons/use``: evaluate a coupon for an amount without consuming a use.

    The use is recorded only when an order redeems the coupon (checkout), so
    ``coupon_used_id`` is always null here.
    """
    row = await conn.fetchrow(SQL_COUPON_BY_CODE, normalize_code(code), user_id)
    if row is None:
        raise CouponNotFound
    eligible = order_amount_cents
    if row["scope"] == "products":
        eligible = order_amount_cents if set(product_ids) & set(row["product_ids"]) else 0
    elif row["scope"] == "categories":
        by_name = await promotions.category_ids_by_name(
            conn, [c for c in categories if isinstance(c, str)]
        )
        given = {c for c in categories if isinstance(c, int)} | set(by_name.values())
        closure = await promotions.category_closure(conn, row["category_ids"])
        eligible = order_amount_cents if given & closure else 0
    verdict = assess(
        row, eligible_cents=eligible, now=datetime.now(UTC), user_used=row["user_used"]
    )
    return {
        "applicable": verdict.applicable,
        "discount_amount": verdict.discount_cents,
        "free_shipping": verdict.free_shipping,
        "final_amount": order_amount_cents - verdict.discount_cents,
        "coupon_used_id": None,
        "reason": verdict.reason,
    }


async def create(conn: Conn, body: dict[str, Any]) -> dict[str, Any]:
    """Insert a coupon template (validated by the route); 409 COUPON_EXISTS on a taken code."""
    try:
        row = await conn.fetchrow(
            SQL_INSERT_COUPON,
            normalize_code(body["code"]),
            body["name"],
            body["type"],
            body.get("amount_off"),
            body.get("percent_off"),
            body.get("max_discount"),
            body["min_amount"],
            body["scope"],
            body["category_ids"],
            body["product_ids"],
            body["valid_from"],
            body["valid_until"],
            body["max_uses_per_user"],
            body.get("total_quantity"),
        )
    except asyncpg.UniqueViolationError:
        raise CouponExists from None
    assert row is not None
    return public(row, await promotions.category_names(conn, row["category_ids"]))
