"""``flashsale reconcile [--repair]`` and ``flashsale rebuild-cache``.

For every recent sale, the units must add up across the two stores:

    quantity (PG) = remaining + reservations in the log + claimed-not-yet-written
                    + live persisted units (PG) + cancelled-not-yet-returned (PG)
                    + moved_out (Redis: on the way back to the SKU)

and every user's count in Redis must equal that user's live and in-flight units.
``rebuild-cache`` rewrites a sale's Redis state from PostgreSQL (after Redis was lost
or flushed). Run it with the gateway stopped and the consumers drained: an event
still in Kafka is not in PostgreSQL yet and would not be counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final, cast

import asyncpg
from redis.asyncio import Redis

from gateway import rediskeys
from gateway.db import create_pool
from gateway.metrics import get_metrics
from gateway.services import flashsale
from gateway.settings import Settings

log = logging.getLogger(__name__)

LOOKBACK_DAYS: Final = 7

SQL_RECENT_SALES = """
SELECT f.*, p.name AS product_name, s.price_cents AS original_price_cents
FROM flash_sales f JOIN skus s ON s.id = f.sku_id JOIN products p ON p.id = f.product_id
WHERE f.end_at > now() - make_interval(days => $1) ORDER BY f.id
"""
SQL_UNITS_BY_USER = """
SELECT o.user_id, o.status, o.flash_units_returned, min(o.id) AS first_order,
       sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1
GROUP BY o.user_id, o.status, o.flash_units_returned
"""
SQL_EXISTING = "SELECT id FROM orders WHERE id = ANY($1::text[])"
SQL_CANCELLED_IDS = "SELECT id FROM orders WHERE flash_sale_id = $1 AND status = 'cancelled'"
SQL_MARK_ALL_RETURNED = """
UPDATE orders SET flash_units_returned = true
WHERE flash_sale_id = $1 AND status = 'cancelled' AND NOT flash_units_returned
"""


@dataclass
class SaleReport:
    sale_id: int
    quantity: int
    remaining: int | None
    in_log: int
    claimed: int
    live: int
    pending_return: int
    moved_out: int
    user_drift: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def drift(self) -> int:
        counted = (
            (self.remaining or 0)
            + self.in_log
            + self.claimed
            + self.live
            + self.pending_return
            + self.moved_out
        )
        return self.quantity - counted

    def line(self) -> str:
        state = (
            "OK"
            if self.drift == 0 and not self.user_drift and self.remaining is not None
            else "DRIFT"
        )
        users = f", users off: {len(self.user_drift)}" if self.user_drift else ""
        redis_state = (
            "missing in Redis" if self.remaining is None else f"remaining={self.remaining}"
        )
        return (
            f"sale {self.sale_id}: {state} quantity={self.quantity} {redis_state} "
            f"log={self.in_log} claimed={self.claimed} live={self.live} "
            f"pending_return={self.pending_return} moved_out={self.moved_out} "
            f"drift={self.drift}{users}"
        )


def _entry_units(entries: dict[bytes, bytes]) -> tuple[int, dict[int, int]]:
    total = 0
    per_user: dict[int, int] = defaultdict(int)
    for oid, raw in entries.items():
        ev = flashsale.parse_log_entry(0, oid.decode(), raw)
        total += ev.quantity
        per_user[ev.user_id] += ev.quantity
    return total, per_user


async def check_sale(db: asyncpg.Pool, redis: Redis, sale: asyncpg.Record) -> SaleReport:
    sid = sale["id"]
    h = cast(dict[bytes, bytes], await redis.hgetall(rediskeys.sale(sid)))
    log_entries = cast(dict[bytes, bytes], await redis.hgetall(rediskeys.log(sid)))
    claimed_entries = cast(dict[bytes, bytes], await redis.hgetall(rediskeys.claimed(sid)))
    if claimed_entries:  # written to PostgreSQL but the claim not dropped yet: count once
        written = {
            r["id"] for r in await db.fetch(SQL_EXISTING, [k.decode() for k in claimed_entries])
        }
        claimed_entries = {k: v for k, v in claimed_entries.items() if k.decode() not in written}
    in_log, log_users = _entry_units(log_entries)
    claimed, claimed_users = _entry_units(claimed_entries)
    live = pending = 0
    expected_users: dict[int, int] = defaultdict(int)
    for r in await db.fetch(SQL_UNITS_BY_USER, sid):
        if r["status"] != "cancelled":
            live += r["units"]
            expected_users[r["user_id"]] += r["units"]
        elif not r["flash_units_returned"]:
            pending += r["units"]
            expected_users[r["user_id"]] += r["units"]
    for users in (log_users, claimed_users):
        for uid, units in users.items():
            expected_users[uid] += units
    redis_users = {int(k): int(v) for k, v in (await redis.hgetall(rediskeys.users(sid))).items()}
    user_drift = {
        uid: (redis_users.get(uid, 0), expected_users.get(uid, 0))
        for uid in set(redis_users) | set(expected_users)
        if redis_users.get(uid, 0) != expected_users.get(uid, 0)
    }
    report = SaleReport(
        sale_id=sid,
        quantity=sale["quantity"],
        remaining=int(h[b"remaining"]) if h else None,
        in_log=in_log,
        claimed=claimed,
        live=live,
        pending_return=pending,
        moved_out=int(h.get(b"moved_out", b"0")) if h else 0,
        user_drift=user_drift if h else {},
    )
    get_metrics().drift.labels(str(sid)).set(abs(report.drift))
    return report


async def rebuild_sale(
    db: asyncpg.Pool, redis: Redis, scripts: flashsale.FlashScripts, sale: asyncpg.Record
) -> dict[str, Any]:
    """Rewrite one sale's Redis state from PostgreSQL, the record."""
    sid = sale["id"]
    live_by_user: dict[int, int] = defaultdict(int)
    first: dict[int, str] = {}
    live = 0
    for r in await db.fetch(SQL_UNITS_BY_USER, sid):
        if r["status"] != "cancelled":
            live += r["units"]
            live_by_user[r["user_id"]] += r["units"]
            first[r["user_id"]] = min(first.get(r["user_id"], r["first_order"]), r["first_order"])
    cancelled = [r["id"] for r in await db.fetch(SQL_CANCELLED_IDS, sid)]
    closed = sale["closed_at"] is not None
    not_live = sale["quantity"] - live
    if closed:
        remaining, moved_out = 0, not_live
    else:
        remaining, moved_out = not_live - sale["returned_quantity"], sale["returned_quantity"]
    pipe = redis.pipeline(transaction=True)
    pipe.delete(*rediskeys.all_sale_keys(sid))
    pipe.hset(
        rediskeys.sale(sid),
        mapping={
            "allotment": sale["quantity"],
            "remaining": remaining,
            "moved_out": moved_out,
            "closed": 1 if closed else 0,
        },
    )
    if live_by_user:
        pipe.hset(rediskeys.users(sid), mapping={str(k): v for k, v in live_by_user.items()})
        pipe.hset(rediskeys.first_order(sid), mapping={str(k): v for k, v in first.items()})
    if cancelled:
        pipe.sadd(rediskeys.returned(sid), *cancelled)
    await pipe.execute()
    await db.execute(SQL_MARK_ALL_RETURNED, sid)
    await flashsale.load_sale(redis, scripts, sale)  # static fields and the sales index
    return {"sale_id": sid, "remaining": remaining, "moved_out": moved_out, "live": live}


async def run(settings: Settings, command: str, repair: bool) -> int:
    db = await create_pool(settings.database, min_size=1, max_size=4)
    redis: Redis = Redis.from_url(settings.redis)
    try:
        scripts = flashsale.FlashScripts.register(redis)
        sales = await db.fetch(SQL_RECENT_SALES, LOOKBACK_DAYS)
        if command == "rebuild-cache":
            for sale in sales:
                print("rebuilt", await rebuild_sale(db, redis, scripts, sale))
            return 0
        bad = 0
        for sale in sales:
            report = await check_sale(db, redis, sale)
            print(report.line())
            for uid, (have, want) in sorted(report.user_drift.items())[:20]:
                print(f"    user {uid}: redis={have} expected={want}")
            if report.drift or report.user_drift or report.remaining is None:
                bad += 1
                if repair:
                    if report.in_log or report.claimed:
                        print(
                            f"    not repaired: {report.in_log + report.claimed} unit(s) in "
                            "flight; stop the gateway and let the consumers drain first"
                        )
                    else:
                        print("    repaired:", await rebuild_sale(db, redis, scripts, sale))
        print(f"{len(sales)} sale(s) checked, {bad} with drift")
        return 1 if bad and not repair else 0
    finally:
        await redis.aclose()
        await db.close()


def main(settings: Settings, *, command: str, repair: bool) -> int:
    return asyncio.run(run(settings, command, repair))
