"""Demo data added by feature areas on top of the base catalog: one upcoming flash sale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis

from flashsale.flash import lifecycle
from flashsale.settings import Settings
from flashsale.stores.redisclient import open_redis
from flashsale.stores.scripts import FlashScripts

DEMO_SALE_SKU_CODE = "noise-cancelling-headphones-1"
SQL_SKU = "SELECT id FROM skus WHERE code = $1"
SQL_ADMIN = "SELECT id FROM users WHERE email = 'admin@demo.local'"
SQL_OPEN_SALE = (
    "SELECT id FROM flash_sales WHERE sku_id = $1 AND end_at > now() AND closed_at IS NULL"
)


async def after_catalog(settings: Settings, pool: asyncpg.Pool, *, created: bool) -> dict[str, Any]:
    sku_id = await pool.fetchval(SQL_SKU, DEMO_SALE_SKU_CODE)
    if sku_id is None:
        return {}
    redis: Redis = open_redis(settings)
    try:
        scripts = FlashScripts.register(redis)
        existing = await pool.fetchval(SQL_OPEN_SALE, sku_id)
        if existing is not None:
            row = await pool.fetchrow(lifecycle.SQL_SALE, existing)
            assert row is not None
            await lifecycle.load_sale(redis, scripts, row)  # Redis may be new (e.g. flushed)
            sale = await lifecycle.sale_view(redis, existing)
        else:
            start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
            sale = await lifecycle.create_sale(
                pool,
                redis,
                scripts,
                sku_id=sku_id,
                flash_price=99900,
                quantity=100,
                per_user_limit=1,
                start_at=start,
                end_at=start + timedelta(hours=2),
                payment_window_s=900,
                created_by=await pool.fetchval(SQL_ADMIN),
            )
    finally:
        await redis.aclose()
    return {
        "flash_sale": f"id {sale['flash_sale_id']}, {sale['total_quantity']} units at "
        f"{sale['product']['flash_price']} cents, starts {sale['start_time']}"
    }
