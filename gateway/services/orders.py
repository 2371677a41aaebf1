"""Orders (interface; the orders area implements it).

``create_order`` is what ``POST /orders`` and ``POST /cart/checkout`` both call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class OrderLineRequest:
    sku_id: int
    quantity: int
    expected_price_cents: int | None = None  # 409 PRICE_CHANGED if the price moved


async def create_order(
    app: web.Application,
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
    raise NotImplementedError("implemented by the orders area")
