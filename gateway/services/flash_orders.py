"""Flash orders as the storefront's order routes see them.

The order routes (``GET /orders/{id}``, cancel) serve regular and flash orders
alike; what is special about a flash order lives here: while its event is in
flight it exists only as a reservation in Redis, and cancelling it returns its
units to the sale rather than to the SKU.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web


async def queued_order(app: web.Application, order_id: str, user_id: int) -> dict[str, Any] | None:
    """A flash order that is still in flight (reserved, not yet in PostgreSQL), or None.

    Shape: ``{"order_id", "status": "queued", "kind": "flash", "flash_sale_id",
    "items": [...], "total_amount", "payment_deadline", "created_at"}``.
    """
    from gateway.services import flashsale

    return await flashsale.queued_order(app, order_id, user_id)


async def cancel_flash_order(
    app: web.Application, conn: asyncpg.Connection, order_id: str, *, reason: str
) -> bool:
    """Cancel an unpaid flash order exactly once; its units go back to the sale.

    Call inside a transaction that has locked the order row; returns False if the
    order was not in ``pending_payment``.
    """
    from gateway.services import flashsale

    return await flashsale.cancel_order(app, conn, order_id, reason=reason)
