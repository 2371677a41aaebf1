"""Flash orders as the order routes see them before they reach PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from flashsale.flash import buckets
from flashsale.flash.cache import SaleState, iso_ms
from flashsale.flash.events import parse_entry
from flashsale.stores import rediskeys


async def queued_order(
    redis: Redis, sales: Mapping[int, SaleState], order_id: str, user_id: int
) -> dict[str, Any] | None:
    """A flash order of ``user_id`` still in flight (reserved, not yet in PostgreSQL), or None.

    ``sales``: the sales to look in (a worker's cached ones), each in ``user_id``'s home
    bucket (where its reservations are).
    """
    sale_ids = list(sales)
    if not sale_ids or not order_id.isdigit():
        return None
    pipe = redis.pipeline(transaction=False)
    for sid in sale_ids:
        k = buckets.home(user_id, sales[sid].buckets)
        pipe.hget(rediskeys.log(sid, k), order_id)
        pipe.hget(rediskeys.claimed(sid, k), order_id)
    found = await pipe.execute()
    for i, sid in enumerate(sale_ids):
        entry = found[2 * i] or found[2 * i + 1]
        if entry:
            ev = parse_entry(sid, order_id, entry)
            if ev.user_id != user_id:
                return None
            return {
                "order_id": order_id,
                "status": "queued",
                "kind": "flash",
                "flash_sale_id": sid,
                "items": [
                    {
                        "product_id": ev.product_id,
                        "sku_id": ev.sku_id,
                        "quantity": ev.quantity,
                        "price": ev.price_cents,
                        "subtotal": ev.price_cents * ev.quantity,
                    }
                ],
                "total_amount": ev.price_cents * ev.quantity,
                "payment_deadline": iso_ms(ev.payment_deadline_ms),
                "created_at": iso_ms(ev.reserved_at_ms),
            }
    return None
