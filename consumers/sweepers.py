"""Background sweepers, run beside the consumers; each is safe to run in many processes.

- stranded: reservations whose event never reached Kafka (the gateway died between the
  script and the ack, or the broker lost it) are published from the reservation log; the
  consumer's claim and ``ON CONFLICT DO NOTHING`` make a double publish harmless. A
  reservation is unclaimed too while its event waits in the topic behind a backlog, so an
  entry counts as stranded only once the consumers have read every partition past its
  time (plus the producer's bound on an ack, ``FLASHSALE_KAFKA_PRODUCE_TIMEOUT_MS``): a
  burst that outruns the consumers is not published twice. The consumers' clocks and
  Redis's are compared: a skew between them moves when an entry is published (early: a
  harmless duplicate; late: by the skew), never whether it is.
- stale claims: a reservation a consumer claimed but never wrote (it died, and the broker
  lost the event: a memory-only broker restarted) is republished from the claims, or the
  claim is dropped if its order is in PostgreSQL after all. So every reservation has an
  owner until its order is in PostgreSQL.
  Both republish with a per-reservation doubling backoff (capped), and not at all while
  PostgreSQL is unreachable: the events wait in the topic, republishing adds nothing.
- recovery: sales not armed under the current Redis run are recounted and re-armed
  (``consumers/recovery.py``).
- deadlines: unpaid flash orders past their payment deadline are cancelled
  (``FOR UPDATE SKIP LOCKED`` + a status guard), then their units go back to Redis
  through an idempotent script (a set of returned order ids), exactly once.
- settle: ended or closed sales return their unsold and released units to the SKU.
- transfers: units one bucket of a split sale gave another and that were not credited
  (the giver died between the two steps) are credited, once
  (``flashsale/flash/buckets.py``).

A sale split into buckets is swept bucket by bucket: each holds its own log and claims.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, cast

import asyncpg
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from consumers.recovery import Recovery
from flashsale.flash import buckets, lifecycle
from flashsale.flash.events import parse_entry
from flashsale.settings import Settings
from flashsale.stores import rediskeys, tasks
from flashsale.stores.kafka import OrderProducer, PublishFailed
from flashsale.stores.metrics import Metrics
from flashsale.stores.scripts import FlashScripts, ReturnUnits
from flashsale.timing import PROBE_TIMEOUT_S, RECENT_SALES_DAYS, TRANSFER_STALE_MS

log = logging.getLogger(__name__)

STRANDED_BATCH: Final = 500
DEADLINE_BATCH: Final = 500
# A step that meets one of these is tried again next round; any other error is a bug.
SWEEP_ERRORS: Final = (
    *tasks.STORE_OR_DATABASE_ERRORS,
    PublishFailed,
    KafkaError,
    TimeoutError,
)

SQL_EXPIRED = """
SELECT id FROM orders
WHERE kind = 'flash' AND status = 'pending_payment' AND payment_deadline < now()
ORDER BY payment_deadline LIMIT $1
FOR UPDATE SKIP LOCKED
"""
SQL_UNRETURNED = """
SELECT o.id, o.user_id, o.flash_sale_id, f.buckets, sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
JOIN flash_sales f ON f.id = o.flash_sale_id
WHERE o.kind = 'flash' AND o.status = 'cancelled' AND NOT o.flash_units_returned
GROUP BY o.id, f.buckets LIMIT $1
"""
SQL_RETIRED_SALES = """
SELECT id FROM flash_sales
WHERE id = ANY($1::bigint[]) AND end_at < now() - interval '1 day'
"""
SQL_MARK_RETURNED = "UPDATE orders SET flash_units_returned = true WHERE id = ANY($1::text[])"
SQL_WRITTEN = "SELECT id FROM orders WHERE id = ANY($1::text[])"


async def publish_stranded(
    settings: Settings, redis: Redis, producer: OrderProducer, metrics: Metrics
) -> int:
    """Publish reservation-log entries older than ``stranded_after_s`` whose events the
    consumers would have read by now (:func:`read_through`)."""
    through = await read_through(redis, producer)
    if through is None:
        return 0
    published = await _republish_every_bucket(
        settings,
        redis,
        producer,
        rediskeys.log_times,
        rediskeys.log,
        settings.stranded_after_s,
        before_ms=through - settings.kafka_produce_timeout_ms,
    )
    return _count(metrics, "stranded_published", published)


async def read_through(redis: Redis, producer: OrderProducer) -> int | None:
    """The time (ms) up to which the consumer group has read every partition of the
    orders topic, as the consumers record it (``consumers/order_events.py``); None while a
    partition has no record yet (no consumer has read it since Redis started)."""
    partitions = await producer.producer.partitions_for(producer.topic)
    marks = cast(dict[bytes, bytes], await redis.hgetall(rediskeys.drained(producer.topic)))
    read = [marks.get(str(p).encode()) for p in partitions]
    if not read or None in read:
        return None
    return min(int(cast(bytes, m)) for m in read)


async def indexed_buckets(redis: Redis) -> list[tuple[int, int]]:
    """(sale id, bucket) of every bucket of every sale in the index."""
    ids = sorted(int(raw) for raw in await redis.smembers(rediskeys.SALES_INDEX))
    counts = await buckets.bucket_counts(redis, ids)
    return [(sid, k) for sid in ids for k in range(counts[sid])]


async def republish_stale_claims(
    settings: Settings, db: asyncpg.Pool, redis: Redis, producer: OrderProducer, metrics: Metrics
) -> int:
    """Republish claims older than ``claim_stale_s`` whose order is not in PostgreSQL."""
    published = await _republish_every_bucket(
        settings,
        redis,
        producer,
        rediskeys.claim_times,
        rediskeys.claimed,
        settings.claim_stale_s,
        db=db,
    )
    return _count(metrics, "claims_republished", published)


async def _republish_every_bucket(
    settings: Settings,
    redis: Redis,
    producer: OrderProducer,
    times: Callable[[int, int], str],
    entries: Callable[[int, int], str],
    after_s: int,
    db: asyncpg.Pool | None = None,
    before_ms: int | None = None,
) -> int:
    """:func:`_republish` over every bucket of every sale; ``times`` and ``entries`` name a
    bucket's keys (the reservation log's, or the claims')."""
    published = 0
    for sale_id, k in await indexed_buckets(redis):
        published += await _republish(
            settings,
            redis,
            producer,
            sale_id,
            k,
            times=times(sale_id, k),
            entries=entries(sale_id, k),
            after_s=after_s,
            db=db,
            before_ms=before_ms,
        )
    return published


# Every action the flash sweepers and the recovery count in flashsale_sweeper_actions_total
# (declared at zero when the consumers start, so that the dashboards plot them from the start).
SWEEPER_ACTIONS = (
    "stranded_published",
    "claims_republished",
    "deadline_cancelled",
    "units_returned",
    "transfers_finished",
    "sales_rearmed",
)


def _count(metrics: Metrics, action: str, n: int) -> int:
    if n:
        metrics.swept.labels(action).inc(n)
    return n


async def _republish(
    settings: Settings,
    redis: Redis,
    producer: OrderProducer,
    sale_id: int,
    bucket: int,
    *,
    times: str,
    entries: str,
    after_s: int,
    db: asyncpg.Pool | None = None,
    before_ms: int | None = None,
) -> int:
    """Publish the entries of ``entries`` due in ``times`` (older than ``after_s``, and
    than ``before_ms`` if given), then push each one's next look back by a doubling wait.
    With ``db``, entries whose order is already written are dropped instead (their
    consumer died between its commit and dropping the claim)."""
    now = int(time.time() * 1000)
    due_by = now - after_s * 1000 if before_ms is None else min(now - after_s * 1000, before_ms)
    ids = cast(
        list[bytes],
        await redis.zrangebyscore(times, "-inf", due_by, start=0, num=STRANDED_BATCH),
    )
    if not ids:
        return 0
    raw_entries = cast(list[bytes | None], await redis.hmget(entries, ids))
    events = [
        parse_entry(sale_id, oid.decode(), entry)
        for oid, entry in zip(ids, raw_entries, strict=True)
        if entry
    ]
    gone = [oid for oid, entry in zip(ids, raw_entries, strict=True) if not entry]
    if db is not None and events:
        written = {r["id"] for r in await db.fetch(SQL_WRITTEN, [e.order_id for e in events])}
        if written:
            await redis.hdel(entries, *written)
            gone += [w.encode() for w in written]
            events = [e for e in events if e.order_id not in written]
    if gone:
        await redis.zrem(times, *gone)
        await redis.hdel(rediskeys.republished(sale_id, bucket), *gone)
    if not events:
        return 0
    await producer.publish_many([(e.key, e.encode()) for e in events])
    tries_key = rediskeys.republished(sale_id, bucket)
    tries = cast(list[bytes | None], await redis.hmget(tries_key, [e.order_id for e in events]))
    now = int(time.time() * 1000)
    due: dict[str, int] = {}
    counts: dict[str | bytes, int] = {}
    for e, raw in zip(events, tries, strict=True):
        n = int(raw or 0) + 1
        wait_s = min(after_s * 2**n, settings.republish_max_backoff_s)
        due[e.order_id] = now + (wait_s - after_s) * 1000
        counts[e.order_id] = n
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(times, due, xx=True)
    pipe.hset(tries_key, mapping=counts)  # type: ignore[arg-type]
    await pipe.execute()
    log.info("sale %d: republished %d reservation(s) from %s", sale_id, len(events), entries)
    return len(events)


async def cancel_expired(db: asyncpg.Pool, metrics: Metrics) -> int:
    """Cancel unpaid flash orders past their deadline (PostgreSQL side)."""
    async with db.acquire() as conn, conn.transaction():
        ids = [r["id"] for r in await conn.fetch(SQL_EXPIRED, DEADLINE_BATCH)]
        cancelled = 0
        for order_id in ids:
            if await lifecycle.cancel_order(conn, order_id, reason="payment_timeout"):
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
        result = ReturnUnits(
            int(
                await scripts.return_units(
                    keys=rediskeys.return_units_keys(sid, buckets.home(r["user_id"], r["buckets"])),
                    args=[r["id"], r["user_id"], r["units"]],
                )
            )
        )
        if result is ReturnUnits.RETURNED:
            returned += r["units"]
        # UNKNOWN_SALE: the sale is not in Redis (rebuild-cache will count it)
        if result is not ReturnUnits.UNKNOWN_SALE:
            done.append(r["id"])
    if done:
        await db.execute(SQL_MARK_RETURNED, done)
    if returned:
        metrics.swept.labels("units_returned").inc(returned)
    return returned


async def settle_ended(db: asyncpg.Pool, redis: Redis, scripts: FlashScripts) -> int:
    total = 0
    for r in await db.fetch(lifecycle.SQL_ENDED_SALES, RECENT_SALES_DAYS):
        total += await lifecycle.settle_sale(db, redis, scripts, r["id"])
    await retire_old_sales(db, redis)
    return total


async def retire_old_sales(db: asyncpg.Pool, redis: Redis) -> int:
    """Drop sales over a day past their end from the index every worker polls twice a
    second (their Redis state stays, for reads and reconcile), once nothing is in flight."""
    retired = 0
    indexed = [int(x) for x in await redis.smembers(rediskeys.SALES_INDEX)]
    if not indexed:
        return 0
    counts = await buckets.bucket_counts(redis, indexed)
    for r in await db.fetch(SQL_RETIRED_SALES, indexed):
        sid = r["id"]
        if await _in_flight(redis, sid, counts[sid]):
            continue
        await redis.srem(rediskeys.SALES_INDEX, sid)
        retired += 1
    return retired


async def _in_flight(redis: Redis, sale_id: int, n: int) -> bool:
    for k in range(n):
        if await redis.hlen(rediskeys.log(sale_id, k)) or await redis.hlen(
            rediskeys.claimed(sale_id, k)
        ):
            return True
        if n > 1 and await redis.hlen(rediskeys.transfers_out(sale_id, k)):
            return True
    return False


async def finish_transfers(redis: Redis, scripts: FlashScripts, metrics: Metrics) -> int:
    """Credit the transfers between buckets that their giver left unfinished."""
    ids = sorted(int(raw) for raw in await redis.smembers(rediskeys.SALES_INDEX))
    credited = 0
    for sid, n in (await buckets.bucket_counts(redis, ids)).items():
        if n > 1:
            credited += await buckets.finish_transfers(
                redis, scripts, sid, n, older_than_ms=TRANSFER_STALE_MS
            )
    return _count(metrics, "transfers_finished", credited)


async def run_sweepers(
    settings: Settings,
    db: asyncpg.Pool,
    redis: Redis,
    producer: OrderProducer,
    metrics: Metrics,
    stop: asyncio.Event,
) -> None:
    scripts = FlashScripts.register(redis)
    recovery = Recovery(settings, db, redis, metrics)
    interval = settings.sweep_interval_ms / 1000
    steps: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("recovery", recovery.run_once),
        ("stranded", lambda: publish_stranded(settings, redis, producer, metrics)),
        ("claims", lambda: republish_stale_claims(settings, db, redis, producer, metrics)),
        ("deadlines", lambda: cancel_expired(db, metrics)),
        ("returns", lambda: return_cancelled_units(db, redis, scripts, metrics)),
        ("settle", lambda: settle_ended(db, redis, scripts)),
        ("transfers", lambda: finish_transfers(redis, scripts, metrics)),
    ]
    republishing = {"stranded", "claims"}

    async def sweep() -> None:
        db_up = await _reachable(db)
        for name, step in steps:
            if name in republishing and not db_up:
                continue  # the events wait in the topic; republishing would only add copies
            with tasks.guarded(f"sweeper {name}", SWEEP_ERRORS):
                await step()

    await tasks.guarded_loop(sweep, name="sweeper", every_s=interval, stop=stop)


async def _reachable(db: asyncpg.Pool) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await db.fetchval("SELECT 1")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True
