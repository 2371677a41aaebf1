"""A flash sale's lifecycle: create, top up, close, settle, load into Redis; cancelling its orders.

Where a unit is counted (see ARCHITECTURE.md): PostgreSQL holds the record
(``flash_sales.quantity`` carved from the SKU; ``sold_quantity``; ``returned_quantity``),
Redis the live counters (``remaining``, per-user counts, the reservation log). For any
sale: ``allotment = remaining + log + claimed + persisted live units + moved_out``,
and moved_out − returned_quantity units are on their way back to the SKU.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from flashsale.errors import (
    InsufficientStock,
    NotFound,
    SaleEnded,
    SkuNotFound,
    ValidationFailed,
)
from flashsale.flash import buckets as bucketing
from flashsale.flash.cache import now_ms, read_state
from flashsale.stores import rediskeys
from flashsale.stores.db import Conn
from flashsale.stores.scripts import FlashScripts, SaleClose, parse_sale_load

log = logging.getLogger(__name__)

SQL_SKU_FOR_SALE = """
SELECT s.id, s.product_id, s.price_cents, p.name
FROM skus s JOIN products p ON p.id = s.product_id WHERE s.id = $1
"""
SQL_CARVE = """
UPDATE skus SET on_hand = on_hand - $2, updated_at = now()
WHERE id = $1 AND on_hand - reserved >= $2 RETURNING on_hand
"""
SQL_INSERT_SALE = """
INSERT INTO flash_sales (sku_id, product_id, flash_price_cents, quantity, per_user_limit,
                         start_at, end_at, payment_window_s, created_by, mode, queue_settings,
                         buckets)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *
"""
SQL_LEDGER = """
INSERT INTO inventory_ledger (sku_id, order_id, delta, reason, flash_sale_id)
VALUES ($1, $2, $3, $4, $5)
"""
SQL_SALE = """
SELECT f.*, p.name AS product_name, s.price_cents AS original_price_cents
FROM flash_sales f JOIN skus s ON s.id = f.sku_id JOIN products p ON p.id = f.product_id
WHERE f.id = $1
"""
SQL_SALE_FOR_UPDATE = "SELECT * FROM flash_sales WHERE id = $1 FOR UPDATE"
SQL_TOP_UP = """
UPDATE flash_sales SET quantity = quantity + $2, updated_at = now() WHERE id = $1 RETURNING quantity
"""
SQL_SET_END = "UPDATE flash_sales SET end_at = $2, updated_at = now() WHERE id = $1"
SQL_CLOSE = """
UPDATE flash_sales SET closed_at = COALESCE(closed_at, now()), updated_at = now() WHERE id = $1
"""
SQL_SETTLE = """
WITH old AS (SELECT returned_quantity FROM flash_sales WHERE id = $1 FOR UPDATE)
UPDATE flash_sales f SET returned_quantity = $2, updated_at = now()
FROM old WHERE f.id = $1 AND old.returned_quantity < $2
RETURNING old.returned_quantity, f.sku_id
"""
SQL_RETURN_TO_SKU = "UPDATE skus SET on_hand = on_hand + $2, updated_at = now() WHERE id = $1"
SQL_ENDED_SALES = """
SELECT id FROM flash_sales
WHERE (end_at <= now() OR closed_at IS NOT NULL) AND end_at > now() - make_interval(days => $1)
ORDER BY id
"""
SQL_CANCEL_FLASH = """
UPDATE orders SET status = 'cancelled', cancelled_at = now(), cancel_reason = $2,
       version = version + 1, updated_at = now()
WHERE id = $1 AND kind = 'flash' AND status = $3
RETURNING flash_sale_id, user_id
"""
SQL_ORDER_UNITS = """
SELECT sku_id, sum(quantity)::int AS units FROM order_items WHERE order_id = $1 GROUP BY sku_id
"""
SQL_SALE_SOLD_DOWN = """
UPDATE flash_sales SET sold_quantity = sold_quantity - $2, updated_at = now() WHERE id = $1
"""


async def load_sale(
    redis: Redis,
    scripts: FlashScripts,
    row: asyncpg.Record | dict[str, Any],
    *,
    new: bool = False,
) -> int:
    """Write a sale's state into Redis (idempotent); returns remaining.

    ``new``: the sale was just created, so its counters are the allotment and it is armed
    under the current Redis run. Otherwise a sale missing from Redis is written unarmed
    (see ``lua/sale_load.lua`` and ``consumers/recovery.py``). A sale of several buckets
    is written bucket by bucket, each with its share of the allotment (a top-up adds each
    share's growth).
    """
    static: list[Any] = [
        "sku",
        row["sku_id"],
        "product",
        row["product_id"],
        "price",
        row["flash_price_cents"],
        "original_price",
        row["original_price_cents"],
        "name",
        row["product_name"],
        "limit",
        row["per_user_limit"],
        "start_ms",
        int(row["start_at"].timestamp() * 1000),
        "end_ms",
        int(row["end_at"].timestamp() * 1000),
        "window_ms",
        row["payment_window_s"] * 1000,
        "mode",
        row["mode"],
        "qcfg",
        orjson.dumps(row["queue_settings"]),
        "buckets",
        row["buckets"],
    ]
    n = int(row["buckets"])
    remaining = 0
    closed = False
    for k, units in enumerate(bucketing.spread(row["quantity"], n)):
        result = parse_sale_load(
            await scripts.load(
                keys=[rediskeys.sale(row["id"], k)],
                args=[row["id"], units, 1 if new else 0, *static, "bucket", k],
            )
        )
        closed = closed or result.closed
        remaining += result.remaining
    await redis.sadd(rediskeys.SALES_INDEX, row["id"])
    if row["closed_at"] is not None:
        for k in range(n):
            await scripts.close(keys=[rediskeys.sale(row["id"], k)])
    if closed:
        raise SaleEnded("the sale is closed")
    return remaining


async def create_sale(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    *,
    sku_id: int,
    flash_price: int,
    quantity: int,
    per_user_limit: int,
    start_at: datetime,
    end_at: datetime,
    payment_window_s: int,
    created_by: int | None,
    mode: str = "open",
    queue_settings: dict[str, Any] | None = None,
    buckets: int = 1,
) -> dict[str, Any]:
    if buckets > 1 and mode != "open":
        raise ValidationFailed(
            fields={"buckets": "a queued sale has one bucket (its waiting room admits by it)"}
        )
    async with db.acquire() as conn, conn.transaction():
        sku = await conn.fetchrow(SQL_SKU_FOR_SALE, sku_id)
        if sku is None:
            raise SkuNotFound
        if await conn.fetchval(SQL_CARVE, sku_id, quantity) is None:
            raise InsufficientStock("not enough stock on the SKU for this allotment")
        sale = await conn.fetchrow(
            SQL_INSERT_SALE,
            sku_id,
            sku["product_id"],
            flash_price,
            quantity,
            per_user_limit,
            start_at,
            end_at,
            payment_window_s,
            created_by,
            mode,
            queue_settings or {},
            buckets,
        )
        assert sale is not None
        await conn.execute(SQL_LEDGER, sku_id, None, -quantity, "flash_allot", sale["id"])
    row = await db.fetchrow(SQL_SALE, sale["id"])
    assert row is not None
    await load_sale(redis, scripts, row, new=True)
    return await sale_view(redis, sale["id"])


async def sale_view(redis: Redis, sale_id: int) -> dict[str, Any]:
    state = await read_state(redis, sale_id)
    if state is None:
        raise NotFound("flash sale not found")
    return state.public(now_ms())


async def top_up(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    add_quantity: int,
    end_at: datetime | None,
) -> dict[str, Any]:
    """Move units from the SKU into a running sale; PostgreSQL first, then Redis adds the
    difference to its allotment (so a retry never adds twice)."""
    async with db.acquire() as conn, conn.transaction():
        sale = await conn.fetchrow(SQL_SALE_FOR_UPDATE, sale_id)
        if sale is None:
            raise NotFound("flash sale not found")
        if sale["closed_at"] is not None or sale["end_at"] <= datetime.now(UTC):
            raise SaleEnded
        if end_at is not None:
            if end_at <= sale["start_at"]:
                raise ValidationFailed(fields={"end_at": "must be after start_at"})
            await conn.execute(SQL_SET_END, sale_id, end_at)
        if add_quantity:
            if await conn.fetchval(SQL_CARVE, sale["sku_id"], add_quantity) is None:
                raise InsufficientStock("not enough stock on the SKU")
            await conn.fetchval(SQL_TOP_UP, sale_id, add_quantity)
            await conn.execute(
                SQL_LEDGER, sale["sku_id"], None, -add_quantity, "flash_topup", sale_id
            )
    row = await db.fetchrow(SQL_SALE, sale_id)
    assert row is not None
    await load_sale(redis, scripts, row)
    return await sale_view(redis, sale_id)


async def close_sale(
    db: asyncpg.Pool, redis: Redis, scripts: FlashScripts, sale_id: int
) -> dict[str, Any]:
    async with db.acquire() as conn:
        if await conn.fetchval("SELECT id FROM flash_sales WHERE id = $1", sale_id) is None:
            raise NotFound("flash sale not found")
        await conn.execute(SQL_CLOSE, sale_id)
    await settle_sale(db, redis, scripts, sale_id)
    return await sale_view(redis, sale_id)


async def settle_sale(db: asyncpg.Pool, redis: Redis, scripts: FlashScripts, sale_id: int) -> int:
    """Close the sale in Redis and return moved-out units to the SKU exactly once.

    ``moved_out`` in Redis only grows; ``returned_quantity`` in PostgreSQL catches up to it
    under a row lock, so running this any number of times, concurrently, moves each unit once.
    """
    moved = int(await scripts.close(keys=[rediskeys.sale(sale_id)]))
    if moved == SaleClose.UNKNOWN_SALE:
        return 0
    n = (await bucketing.bucket_counts(redis, [sale_id]))[sale_id]
    for k in range(1, n):  # every bucket's share; moved_out only grows in each
        moved += max(0, int(await scripts.close(keys=[rediskeys.sale(sale_id, k)])))
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(SQL_SETTLE, sale_id, moved)
        if row is None:
            return 0
        delta = moved - int(row["returned_quantity"])
        await conn.execute(SQL_RETURN_TO_SKU, row["sku_id"], delta)
        await conn.execute(SQL_LEDGER, row["sku_id"], None, delta, "flash_return", sale_id)
    log.info("sale %d: returned %d unit(s) to sku %d", sale_id, delta, row["sku_id"])
    return delta


async def cancel_order(
    conn: Conn, order_id: str, *, reason: str, from_status: str = "pending_payment"
) -> bool:
    """PostgreSQL side of cancelling a flash order, inside the caller's transaction: an
    unpaid one, or (``from_status="paid"``) a paid one refunded before it shipped.

    The units go back to Redis after the transaction commits, through
    :func:`return_cancelled_units` (run by the sweeper), so a rolled-back cancel never
    returns units that are still sold.
    """
    row = await conn.fetchrow(SQL_CANCEL_FLASH, order_id, reason, from_status)
    if row is None:
        return False
    for item in await conn.fetch(SQL_ORDER_UNITS, order_id):
        await conn.execute(SQL_SALE_SOLD_DOWN, row["flash_sale_id"], item["units"])
        await conn.execute(
            SQL_LEDGER,
            item["sku_id"],
            order_id,
            item["units"],
            "flash_cancel",
            row["flash_sale_id"],
        )
    return True
