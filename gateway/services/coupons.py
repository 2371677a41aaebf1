"""Coupons and the price of an order (interface; the cart/marketing area implements it).

``gateway.services.orders.create_order`` calls :func:`quote` to price the lines
and :func:`redeem`/:func:`unredeem` as its coupon step and that step's undo.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from gateway.errors import ValidationFailed


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


async def quote(
    conn: asyncpg.Connection, *, user_id: int, lines: list[PricedLine], coupon_code: str | None
) -> Quote:
    """Subtotal, shipping, the best promotion and coupon discount, and the total."""
    if coupon_code:
        raise ValidationFailed(fields={"coupon_code": "unknown coupon"})
    subtotal = sum(line.subtotal_cents for line in lines)
    return Quote(subtotal, 0, 0, subtotal, None)


async def redeem(
    conn: asyncpg.Connection,
    *,
    user_id: int,
    code: str | None,
    lines: list[PricedLine],
    order_id: str,
) -> CouponApplication:
    """Record a coupon use for an order (ValidationFailed/Conflict if it cannot apply)."""
    if code:
        raise ValidationFailed(fields={"coupon_code": "unknown coupon"})
    return CouponApplication(None, None, 0, False)


async def unredeem(conn: asyncpg.Connection, coupon_use_id: int) -> None:
    """Undo :func:`redeem` (the order failed after the coupon step)."""
