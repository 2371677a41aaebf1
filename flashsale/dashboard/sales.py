"""The list of sales a dashboard shows, with Redis's live remaining beside each."""

from __future__ import annotations

from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale.flash.cache import iso_ms, now_ms
from flashsale.stores import rediskeys

SQL_SALES: Final = """
SELECT fs.id, fs.sku_id, fs.product_id, p.name, p.merchant_id, fs.flash_price_cents,
       fs.quantity, fs.sold_quantity, fs.start_at, fs.end_at, fs.closed_at
FROM flash_sales fs JOIN products p ON p.id = fs.product_id
WHERE $1::bigint IS NULL OR p.merchant_id = $1
ORDER BY fs.start_at DESC, fs.id DESC
LIMIT $2
"""
SQL_SALE_MERCHANT: Final = """
SELECT p.merchant_id FROM flash_sales fs JOIN products p ON p.id = fs.product_id
WHERE fs.id = $1
"""


def sale_status(
    *, now: int, start_ms: int, end_ms: int, closed: bool, remaining: int | None
) -> str:
    """upcoming / active / sold_out / ended / closed, as a person running the sale says it."""
    if closed:
        return "closed"
    if now >= end_ms:
        return "ended"
    if now < start_ms:
        return "upcoming"
    return "sold_out" if remaining is not None and remaining <= 0 else "active"


async def list_sales(
    pool: asyncpg.Pool,
    redis: Redis,
    *,
    merchant_id: int | None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """The sales a dashboard lists (a merchant's own when ``merchant_id`` is given), newest
    first, with Redis's live remaining where the sale is loaded there."""
    rows = await pool.fetch(SQL_SALES, merchant_id, limit)
    if not rows:
        return []
    pipe = redis.pipeline(transaction=False)
    for r in rows:
        pipe.hmget(rediskeys.sale(r["id"]), "remaining", "allotment", "closed")
    live = await pipe.execute()
    now = now_ms()
    out = []
    for r, (remaining, allotment, closed_flag) in zip(rows, live, strict=True):
        start = int(r["start_at"].timestamp() * 1000)
        end = int(r["end_at"].timestamp() * 1000)
        closed = r["closed_at"] is not None or closed_flag == b"1"
        left = int(remaining) if remaining is not None else None
        total = int(allotment) if allotment is not None else r["quantity"]
        out.append(
            {
                "flash_sale_id": r["id"],
                "product_name": r["name"],
                "sku_id": r["sku_id"],
                "flash_price": r["flash_price_cents"],
                "merchant_id": r["merchant_id"],
                "total_quantity": total,
                "remaining_quantity": left,
                "start_time": iso_ms(start),
                "end_time": iso_ms(end),
                "status": sale_status(
                    now=now, start_ms=start, end_ms=end, closed=closed, remaining=left
                ),
            }
        )
    return out


async def sale_merchant(pool: asyncpg.Pool, sale_id: int) -> int | None:
    """The merchant whose product a sale sells, or None for an unknown sale."""
    merchant: int | None = await pool.fetchval(SQL_SALE_MERCHANT, sale_id)
    return merchant
