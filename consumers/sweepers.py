"""Background sweepers, run beside the consumers; each is safe to run in many processes.

- stranded: reservations whose event never reached Kafka (the gateway died between the
  script and the ack) are published from the reservation log; the consumer's claim and
  ``ON CONFLICT DO NOTHING`` make a double publish harmless.
- deadlines: unpaid flash orders past their payment deadline are cancelled
  (``FOR UPDATE SKIP LOCKED`` + a status guard), then their units go back to Redis
  through an idempotent script (a set of returned order ids), exactly once.
- settle: ended or closed sales return their unsold and released units to the SKU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, cast

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import rediskeys
from gateway.kafka import OrderProducer, PublishFailed
from gateway.metrics import Metrics
from gateway.services import flashsale
from gateway.services.flashsale import FlashScripts
from gateway.settings import Settings

log = logging.getLogger(__name__)

STRANDED_BATCH: Final = 500
DEADLINE_BATCH: Final = 500
SETTLE_LOOKBACK_DAYS: Final = 7

SQL_EXPIRED = """
SELECT id FROM orders
WHERE kind = 'flash' AND status = 'pending_payment' AND payment_deadline < now()
ORDER BY payment_deadline LIMIT $1
FOR UPDATE SKIP LOCKED
"""
SQL_UNRETURNED = """
SELECT o.id, o.user_id, o.flash_sale_id, sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.kind = 'flash' AND o.status = 'cancelled' AND NOT o.flash_units_returned
GROUP BY o.id LIMIT $1
"""
SQL_RETIRED_SALES = """
SELECT id FROM flash_sales
WHERE id = ANY($1::bigint[]) AND end_at < now() - interval '1 day'
"""
SQL_MARK_RETURNED = "UPDATE orders SET flash_units_returned = true WHERE id = ANY($1::text[])"


async def publish_stranded(
    settings: Settings, redis: Redis, producer: OrderProducer, metrics: Metrics
) -> int:
    """Publish reservation-log entries older than ``stranded_after_s``."""
    cutoff = int(time.time() * 1000) - settings.stranded_after_s * 1000
    published = 0
    for raw in await redis.smembers(rediskeys.SALES_INDEX):
        sale_id = int(raw)
        ids = cast(
            list[bytes],
            await redis.zrangebyscore(
                rediskeys.log_times(sale_id), "-inf", cutoff, start=0, num=STRANDED_BATCH
            ),
        )
        if not ids:
            continue
        entries = cast(list[bytes | None], await redis.hmget(rediskeys.log(sale_id), ids))
        events = [
            flashsale.parse_log_entry(sale_id, oid.decode(), entry)
            for oid, entry in zip(ids, entries, strict=True)
            if entry
        ]
        if not events:
            await redis.zrem(rediskeys.log_times(sale_id), *ids)
            continue
        await producer.publish_many([(e.key, e.encode()) for e in events])
        now = int(time.time() * 1000)
        await redis.zadd(rediskeys.log_times(sale_id), {e.order_id: now for e in events}, xx=True)
        published += len(events)
        log.info("sale %d: published %d stranded reservation(s)", sale_id, len(events))
    if published:
        metrics.swept.labels("stranded_published").inc(published)
    return published


async def cancel_expired(db: asyncpg.Pool, metrics: Metrics) -> int:
    """Cancel unpaid flash orders past their deadline (PostgreSQL side)."""
    async with db.acquire() as conn, conn.transaction():
        ids = [r["id"] for r in await conn.fetch(SQL_EXPIRED, DEADLINE_BATCH)]
        cancelled = 0
        for order_id in ids:
            if await flashsale.cancel_order(None, conn, order_id, reason="payment_timeout"):
                cancelled += 1
    if cancelled:
        metrics.swept.labels("deadline_cancelled").inc(cancelled)
    return cancelled


async def return_cancelled_units(
    db: asyncpg.Pool, redis: Redis, scripts: FlashScripts, metrics: Metrics
) -> int:
    """Give the units of cancelled flash orders back in Redis, once per order."""
    rows = await db.fetch(SQL_UNRETURNED, DEADLINE_BATCH)
    done: list[str] = []
    returned = 0
    for r in rows:
        sid = r["flash_sale_id"]
        result = await scripts.return_units(
            keys=rediskeys.return_units_keys(sid),
            args=[r["id"], r["user_id"], r["units"]],
        )
        if int(result) == 1:
            returned += r["units"]
        if int(result) >= 0:  # -1: the sale is not in Redis (rebuild-cache will count it)
            done.append(r["id"])
    if done:
        await db.execute(SQL_MARK_RETURNED, done)
    if returned:
        metrics.swept.labels("units_returned").inc(returned)
    return returned


async def settle_ended(db: asyncpg.Pool, redis: Redis, scripts: FlashScripts) -> int:
    total = 0
    for r in await db.fetch(flashsale.SQL_ENDED_SALES, SETTLE_LOOKBACK_DAYS):
        total += await flashsale.settle_sale(db, redis, scripts, r["id"])
    await retire_old_sales(db, redis)
    return total


async def retire_old_sales(db: asyncpg.Pool, redis: Redis) -> int:
    """Drop sales over a day past their end from the index every worker polls twice a
    second (their Redis state stays, for reads and reconcile), once nothing is in flight."""
    retired = 0
    indexed = [int(x) for x in await redis.smembers(rediskeys.SALES_INDEX)]
    if not indexed:
        return 0
    for r in await db.fetch(SQL_RETIRED_SALES, indexed):
        sid = r["id"]
        if await redis.hlen(rediskeys.log(sid)) or await redis.hlen(rediskeys.claimed(sid)):
            continue
        await redis.srem(rediskeys.SALES_INDEX, sid)
        retired += 1
    return retired


async def run_sweepers(
    settings: Settings,
    db: asyncpg.Pool,
    redis: Redis,
    producer: OrderProducer,
    metrics: Metrics,
    stop: asyncio.Event,
) -> None:
    scripts = FlashScripts.register(redis)
    interval = settings.sweep_interval_ms / 1000
    while not stop.is_set():
        steps: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("stranded", lambda: publish_stranded(settings, redis, producer, metrics)),
            ("deadlines", lambda: cancel_expired(db, metrics)),
            ("returns", lambda: return_cancelled_units(db, redis, scripts, metrics)),
            ("settle", lambda: settle_ended(db, redis, scripts)),
        ]
        for name, step in steps:
            try:
                await step()
            except (
                RedisError,
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                PublishFailed,
            ) as exc:
                log.warning("sweeper %s failed: %s", name, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
