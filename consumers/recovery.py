"""Re-arming sales after Redis may have lost writes.

Redis is a gate, never the record. A sale's live counters are trusted only under the
Redis run that armed them: ``lua/reserve.lua`` refuses (``SALE_RECOVERING``, 503) a
sale whose ``armed`` field is not the run id of the server it runs on. A restart (even
with an intact AOF: the last second may be gone), a failover to a replica, or a key
that vanished all change or drop that stamp, so no join is taken on counters that may
have forgotten units already promised.

This sweeper finds such sales and recomputes their counters from the truth:

- the record, PostgreSQL: persisted live orders, cancelled ones, what went back to the
  SKU;
- the orders still in flight: the broker's events past the consumer group's committed
  offsets, and the reservation log and claims that survived in Redis (an order seen in
  several places is counted once, and sources are read in the reverse of the order an
  event moves through them, so one that moves during the snapshot is never missed);

then writes them and the new run id in one script (``lua/sale_rearm.lua``), which
refuses if Redis restarted again meanwhile.
It waits ``grace_s`` after first seeing a fenced sale, so that an event a gateway was
still publishing when Redis went down is in the broker (or was given up) before the
snapshot is taken.

A sale split into buckets (``flashsale/flash/buckets.py``) is recounted as a whole when
any bucket is fenced: one recovery process at a time (a lease in bucket 0) fences every
bucket with one token, takes the snapshot, and re-arms each bucket with its share (its
shoppers' counts, reservations and returned orders; an even part of what remains) under
that token, the sale's new epoch. A bucket another recount fenced since is left to it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from flashsale.flash import lifecycle
from flashsale.flash.events import BadEvent, OrderEvent, decode, parse_entry
from flashsale.flash.recount import Snapshot, recount
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.metrics import Metrics
from flashsale.stores.redisclient import run_id, run_ids
from flashsale.stores.scripts import FlashScripts, Rearm, register
from flashsale.timing import (
    BROKER_REQUEST_TIMEOUT_MS,
    REARM_LEASE_MS,
    RECENT_SALES_DAYS,
    RECOVERY_READ_TIMEOUT_S,
)

log = logging.getLogger(__name__)


SQL_RECENT_SALES = """
SELECT f.*, p.name AS product_name, s.price_cents AS original_price_cents
FROM flash_sales f JOIN skus s ON s.id = f.sku_id JOIN products p ON p.id = f.product_id
WHERE f.end_at > now() - make_interval(days => $1) ORDER BY f.id
"""
SQL_ORDER_UNITS = """
SELECT o.id, o.user_id, o.status, sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1 GROUP BY o.id
"""
SQL_MARK_ALL_RETURNED = """
UPDATE orders SET flash_units_returned = true
WHERE flash_sale_id = $1 AND status = 'cancelled' AND NOT flash_units_returned
"""


async def server_run_id(redis: Redis, sale_id: int) -> str:
    """The run id of the Redis server holding ``sale_id`` (a cluster's primary of its slot)."""
    return await run_id(redis, rediskeys.sale(sale_id))


async def unconsumed_events(
    settings: Settings, *, timeout_s: float = RECOVERY_READ_TIMEOUT_S
) -> list[OrderEvent]:
    """Every order event in the topic past the consumer group's committed offsets.

    Reads with the group's id (to see its offsets) on a manual assignment, so it never
    joins the group nor commits. Raises TimeoutError if the end is not reached in time.
    """
    topic = settings.kafka_orders_topic
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka, request_timeout_ms=BROKER_REQUEST_TIMEOUT_MS
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        if topic not in set(await admin.list_topics()):
            return []
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = sorted(p["partition"] for d in described for p in d.get("partitions", []))
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka,
        group_id=settings.kafka_consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="flashsale-recovery",
    )
    await consumer.start()
    events: list[OrderEvent] = []
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        deadline = time.monotonic() + timeout_s
        pending = set(tps)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout_s}s")
            batches = await consumer.getmany(*pending, timeout_ms=300, max_records=5000)
            for recs in batches.values():
                for rec in recs:
                    try:
                        events.append(decode(rec.value))
                    except BadEvent:
                        continue  # the consumer dead-letters it; it holds no units
            for tp in list(pending):
                high = consumer.highwater(tp)  # end_offsets() is wrong on tansu
                if high is not None and await consumer.position(tp) >= high:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return events


async def snapshot(
    db: asyncpg.Pool, redis: Redis, sale: asyncpg.Record, broker_events: Iterable[OrderEvent]
) -> Snapshot:
    """Recompute one sale from the broker's events (read first), Redis, then PostgreSQL."""
    sid = sale["id"]
    n = int(sale["buckets"])
    pipe = redis.pipeline(transaction=False)
    for k in range(n):
        pipe.hgetall(rediskeys.log(sid, k))
        pipe.hgetall(rediskeys.claimed(sid, k))
        pipe.smembers(rediskeys.voided(sid, k))
    found = await pipe.execute()
    voided = [raw.decode() for k in range(n) for raw in cast(set[bytes], found[3 * k + 2])]
    reserved = [
        parse_entry(sid, raw_id.decode(), entry)
        for k in range(n)
        for entries in (found[3 * k], found[3 * k + 1])
        for raw_id, entry in cast(dict[bytes, bytes], entries).items()
    ]
    return recount(
        sale,
        broker_events=broker_events,
        voided=voided,
        reserved=reserved,
        orders=await db.fetch(SQL_ORDER_UNITS, sid),
        now_s=time.time(),
    )


@dataclass
class Recovery:
    """Finds fenced sales and re-arms them; one per consumer process (any number run)."""

    settings: Settings
    db: asyncpg.Pool
    redis: Redis
    metrics: Metrics
    grace_s: float = 0.0
    noticed: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.grace_s:
            self.grace_s = self.settings.kafka_produce_timeout_ms / 1000 + 1.0
        self._rearm = register(self.redis, "sale_rearm")
        self._scripts = FlashScripts.register(self.redis)

    async def fenced(self) -> tuple[dict[int, list[str]], list[asyncpg.Record]]:
        """The run id of the server holding each bucket of each recent sale, and the sales
        with a bucket not armed under it.

        On a Redis Cluster each bucket is held by the primary of its slot: a failover
        changes the run id of that shard's buckets only.
        """
        sales = await self.db.fetch(SQL_RECENT_SALES, RECENT_SALES_DAYS)
        if not sales:
            return {}, []
        keys = [rediskeys.sale(s["id"], k) for s in sales for k in range(s["buckets"])]
        found = iter(await run_ids(self.redis, keys))
        runs = {s["id"]: [next(found) for _ in range(s["buckets"])] for s in sales}
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "armed")
        armed = iter(await pipe.execute())
        fenced = []
        for s in sales:
            mine = [next(armed) for _ in range(s["buckets"])]
            if any(a != r.encode() for a, r in zip(mine, runs[s["id"]], strict=True)):
                fenced.append(s)
        return runs, fenced

    async def run_once(self, *, force: bool = False) -> int:
        """Re-arm every fenced sale whose grace has passed; returns how many were armed."""
        runs, fenced = await self.fenced()
        now = time.monotonic()
        fenced_ids = {s["id"] for s in fenced}
        for sid in list(self.noticed):
            if sid not in fenced_ids:
                del self.noticed[sid]
        due: list[asyncpg.Record] = []
        for sale in fenced:
            sid = sale["id"]
            if sid not in self.noticed:
                self.noticed[sid] = now
                log.warning(
                    "sale %d is not armed under Redis run %s: joins answer SALE_RECOVERING "
                    "until its counters are recomputed",
                    sid,
                    runs[sid][0][:8],
                )
                if not all(
                    [
                        await self.redis.exists(rediskeys.sale(sid, k))
                        for k in range(sale["buckets"])
                    ]
                ):
                    # lost outright: put its static fields back (unarmed, nothing to sell)
                    # so that the gateway answers "recovering", not "unknown sale"
                    await lifecycle.load_sale(self.redis, self._scripts, sale, new=False)
            if force or now - self.noticed[sid] >= self.grace_s:
                due.append(sale)
        if not due:
            return 0
        events = await unconsumed_events(self.settings)
        armed = 0
        for sale in due:
            sid = sale["id"]
            if sale["buckets"] > 1:
                result = await self._recount_split(sale, runs[sid], events)
            else:
                snap = await snapshot(self.db, self.redis, sale, events)
                result = Rearm(
                    int(
                        await self._rearm(
                            keys=rediskeys.rearm_keys(sid), args=[runs[sid][0], snap.payload()]
                        )
                    )
                )
                if result is Rearm.ARMED:
                    await self._armed(snap)
            if result is Rearm.RUN_CHANGED:
                log.warning("Redis restarted while sale %d was recomputed; again", sid)
                return armed
            if result is Rearm.ARMED:
                armed += 1
            self.noticed.pop(sid, None)
        return armed

    async def _recount_split(
        self, sale: asyncpg.Record, runs: list[str], events: list[OrderEvent]
    ) -> Rearm | None:
        """Recount a sale of several buckets as a whole (see the module's docstring);
        None when another process is recounting it."""
        sid, n = sale["id"], int(sale["buckets"])
        token = secrets.token_hex(8)
        lease = rediskeys.rearm_lease(sid)
        if not await self.redis.set(lease, token, nx=True, px=REARM_LEASE_MS):
            return None
        try:
            pipe = self.redis.pipeline(transaction=False)
            for k in range(n):  # no bucket sells, gives or takes from here on
                pipe.hset(rediskeys.sale(sid, k), "fence", token)
                pipe.hdel(rediskeys.sale(sid, k), "armed")
            await pipe.execute()
            snap = await snapshot(self.db, self.redis, sale, events)
            for k in range(n):
                result = Rearm(
                    int(
                        await self._rearm(
                            keys=rediskeys.rearm_keys(sid, k),
                            args=[runs[k], snap.payload(k), token],
                        )
                    )
                )
                if result is not Rearm.ARMED:
                    log.warning("sale %d bucket %d: re-arm %s", sid, k, result.name)
                    return result
            await self._armed(snap)
            return Rearm.ARMED
        finally:
            if await self.redis.get(lease) == token.encode():
                await self.redis.delete(lease)

    async def _armed(self, snap: Snapshot) -> None:
        await self.db.execute(SQL_MARK_ALL_RETURNED, snap.sale_id)
        await self.redis.sadd(rediskeys.SALES_INDEX, snap.sale_id)
        self.metrics.swept.labels("sales_rearmed").inc()
        log.warning(
            "sale %d re-armed%s: remaining=%d live=%d in_flight=%d (%d order(s)) moved_out=%d%s",
            snap.sale_id,
            f" over {snap.buckets} buckets" if snap.buckets > 1 else "",
            snap.remaining,
            snap.live,
            sum(e.quantity for e in snap.inflight.values()),
            len(snap.inflight),
            snap.moved_out,
            f"; {snap.deficit} unit(s) promised beyond the allotment" if snap.deficit else "",
        )

    async def fence_all(self) -> int:
        """Un-arm every recent sale (``flashsale rebuild-cache``): the next pass re-arms them."""
        sales = await self.db.fetch(SQL_RECENT_SALES, RECENT_SALES_DAYS)
        pipe = self.redis.pipeline(transaction=False)
        for s in sales:
            pipe.hdel(rediskeys.sale(s["id"]), "armed")
        await pipe.execute()
        return len(sales)
