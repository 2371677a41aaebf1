"""The flash order-event consumer: Kafka batch → one PostgreSQL transaction → offsets.

For each batch: parse (bad messages go to the dead-letter topic with the reason),
claim the reservations in Redis (a claimed reservation can no longer be released by
a late compensation; a voided one is never persisted), write orders, items, ledger
rows and the sale counters in one transaction (the orders not yet in the database, by
COPY; by ``ON CONFLICT DO NOTHING`` on the order id when another transaction wrote one
meanwhile), then drop the claims and commit the offsets. A crash anywhere replays the
batch, and the replay changes nothing that was already written.

An accepted order is never dropped. Under the sale rows' locks, each new order takes
units from what the sale has left in the record; one that finds none (Redis promised a
unit twice: what the sale's fence is there to prevent, so this is the net beneath it) is
written with status ``oversold``: visible to its shopper, never payable, counted in a
metric and by reconcile.

Many consumers drain one hot sale side by side: its events are keyed by order id, so
they spread over every partition, and each transaction takes the sale row's lock only
at its end, after its orders, items and ledger rows are written (concurrently with the
other consumers). Under the lock it reads what the record has left, marks the few new
orders that find nothing as ``oversold``, and adds the batch's units to the counter in
one UPDATE per sale; the lock is held until the commit, and that short step is the only
one the consumers take in turn.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from flashsale.flash import buckets, shipping
from flashsale.flash.events import BadEvent, OrderEvent, decode
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.db import Conn, lost_database
from flashsale.stores.kafka import OrderProducer, PublishFailed, assignor
from flashsale.stores.metrics import Metrics
from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.stores.scripts import Claim, register
from flashsale.stores.tasks import STORE_ERRORS
from flashsale.timing import BATCH_RETRY_BACKOFF_S, POLL_RETRY_S

log = logging.getLogger(__name__)

# A batch that fails with one of these, or with PostgreSQL out of reach as the gateway
# judges it (``lost_database``: also an operator's cancel or shutdown, a statement timeout,
# too many connections), is tried again: a store out of reach, a conflict with another
# consumer. Anything else is a bug and ends the consumer.
BATCH_RETRY_ERRORS: Final[tuple[type[BaseException], ...]] = (
    *STORE_ERRORS,
    asyncpg.InterfaceError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    PublishFailed,
)


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, BATCH_RETRY_ERRORS) or lost_database(exc)


SQL_SALES = """
SELECT id, sku_id, product_id, buckets FROM flash_sales WHERE id = ANY($1::bigint[])
"""
SQL_USERS = "SELECT id FROM users WHERE id = ANY($1::bigint[])"
# NO KEY UPDATE: does not wait for the KEY SHARE locks the other consumers' order rows
# take on the sale through their foreign key, so their inserts never queue behind it.
SQL_LOCK_SALES = """
SELECT id, quantity - sold_quantity - returned_quantity AS unsold
FROM flash_sales WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE
"""
SQL_EXISTING = "SELECT id FROM orders WHERE id = ANY($1::text[])"
SQL_INSERT_NEW_ORDERS = """
INSERT INTO orders (id, user_id, kind, status, total_cents, pay_cents, payment_deadline,
                    created_at, updated_at, flash_sale_id, shipping_address)
SELECT o.id, o.user_id, 'flash', o.status, o.total, o.total,
       to_timestamp(o.deadline_ms / 1000.0), to_timestamp(o.reserved_ms / 1000.0), now(), o.sale_id,
       o.address
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::text[], $8::jsonb[])
     AS o(id, user_id, total, deadline_ms, reserved_ms, sale_id, status, address)
"""
SQL_INSERT_ORDERS = SQL_INSERT_NEW_ORDERS + "ON CONFLICT (id) DO NOTHING RETURNING id"
OVERSOLD: Final = "oversold"
PENDING: Final = "pending_payment"
SQL_INSERT_ITEMS = """
INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents, snapshot_id)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[],
                     $6::bigint[])
"""
SQL_INSERT_LEDGER = """
INSERT INTO inventory_ledger (sku_id, order_id, delta, reason, flash_sale_id)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::bigint[])
ON CONFLICT DO NOTHING
"""
# The fast path writes the batch without INSERT ... ON CONFLICT (its speculative insertion
# costs a second WAL record per row) and the items and ledger rows with binary COPY (one
# WAL record per heap page instead of one per row). Every order in it is new (checked
# just before); a concurrent writer of the same order id (two consumers replaying one
# batch across a rebalance) makes it fail on the primary key, and the batch is then
# written by the ON CONFLICT statements instead. (The orders go as CSV: their JSONB
# address has no binary encoder on the pool's connections, which binary COPY needs.)
ORDER_COLUMNS: Final = (
    "id", "user_id", "kind", "status", "total_cents", "pay_cents", "payment_deadline",
    "created_at", "flash_sale_id", "shipping_address",
)  # fmt: skip
ITEM_COLUMNS: Final = ("order_id", "product_id", "sku_id", "quantity", "price_cents", "snapshot_id")
LEDGER_COLUMNS: Final = ("sku_id", "order_id", "delta", "reason", "flash_sale_id")
FLASH_SOLD: Final = "flash_sold"
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
SQL_SALE_SOLD = """
UPDATE flash_sales SET sold_quantity = sold_quantity + $2, updated_at = now() WHERE id = $1
"""
SQL_MARK_OVERSOLD = "UPDATE orders SET status = $2 WHERE id = ANY($1::text[])"
SQL_UNLEDGER = """
DELETE FROM inventory_ledger WHERE order_id = ANY($1::text[]) AND reason = 'flash_sold'
"""


@dataclass
class BatchOutcome:
    persisted: int = 0
    duplicates: int = 0
    voided: int = 0
    dead: list[tuple[ConsumerRecord[bytes, bytes], str]] = field(default_factory=list)
    broken: list[OrderEvent] = field(default_factory=list)  # parsed, but breaks a rule
    oversold: list[OrderEvent] = field(default_factory=list)  # written, beyond the allotment


@dataclass
class Persisted:
    new: list[str] = field(default_factory=list)
    oversold: list[OrderEvent] = field(default_factory=list)


async def persist(conn: Conn, events: list[OrderEvent]) -> Persisted:
    """Write events in one transaction; returns the ids that were new, and the new
    orders that found no unit left in the record (written as ``oversold``)."""
    out = Persisted()
    if not events:
        return out
    async with conn.transaction():
        existing = {r["id"] for r in await conn.fetch(SQL_EXISTING, [e.order_id for e in events])}
        unique: dict[str, OrderEvent] = {}
        for e in events:
            if e.order_id not in existing:
                unique.setdefault(e.order_id, e)
        # in order-id order: two consumers replaying overlapping batches (a rebalance)
        # wait for each other's rows in the same order, never in a cycle
        fresh = [unique[oid] for oid in sorted(unique)]
        if not fresh:
            return out
        ship = await shipping.prepare(conn, fresh)  # item snapshots and shipping addresses
        if not await _copy(conn, fresh, ship):
            new_ids = {r["id"] for r in await _insert(conn, fresh, ship)}
            fresh = [e for e in fresh if e.order_id in new_ids]
            if not fresh:
                return out
        oversold = await _count_units(conn, fresh)
    out.new = [e.order_id for e in fresh]
    out.oversold = oversold
    return out


def _at(ms: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms)).isoformat()


def _orders_csv(fresh: list[OrderEvent], ship: shipping.Shipping) -> bytes:
    """The new orders as COPY's CSV (an empty unquoted field is NULL)."""
    out = io.StringIO()
    writer = csv.writer(out)
    for e, address in zip(fresh, ship.addresses_of(fresh), strict=True):
        writer.writerow(
            (
                e.order_id,
                e.user_id,
                "flash",
                PENDING,
                e.price_cents * e.quantity,
                e.price_cents * e.quantity,
                _at(e.payment_deadline_ms),
                _at(e.reserved_at_ms),
                e.sale_id,
                None if address is None else orjson.dumps(address).decode(),
            )
        )
    return out.getvalue().encode()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data  # (asyncpg takes bytes as a path name)


def _order_columns(fresh: list[OrderEvent], ship: shipping.Shipping) -> list[list[Any]]:
    """The parameters of the order INSERTs: one array per column."""
    return [
        [e.order_id for e in fresh],
        [e.user_id for e in fresh],
        [e.price_cents * e.quantity for e in fresh],
        [e.payment_deadline_ms for e in fresh],
        [e.reserved_at_ms for e in fresh],
        [e.sale_id for e in fresh],
        [PENDING] * len(fresh),
        ship.addresses_of(fresh),
    ]


def _item_rows(fresh: list[OrderEvent], snapshots: list[int | None]) -> list[tuple[Any, ...]]:
    """The ``order_items`` rows of the batch, in ``ITEM_COLUMNS`` order."""
    return [
        (e.order_id, e.product_id, e.sku_id, e.quantity, e.price_cents, snapshot)
        for e, snapshot in zip(fresh, snapshots, strict=True)
    ]


def _ledger_rows(fresh: list[OrderEvent]) -> list[tuple[Any, ...]]:
    """The ``inventory_ledger`` rows of the batch (units out of stock, sold by the sale), in
    ``LEDGER_COLUMNS`` order."""
    return [(e.sku_id, e.order_id, -e.quantity, FLASH_SOLD, e.sale_id) for e in fresh]


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows (at least one) as one array per column: the parameters of an ``INSERT ...
    SELECT FROM unnest``."""
    return [list(column) for column in zip(*rows, strict=True)]


async def _copy(conn: Conn, fresh: list[OrderEvent], ship: shipping.Shipping) -> bool:
    """Orders (as payable), items and ledger rows, all or nothing (a savepoint): False
    when an order id was written meanwhile by another transaction."""
    snapshots = ship.snapshots_of(fresh)
    try:
        async with conn.transaction():
            await conn.copy_to_table(
                "orders",
                source=_once(_orders_csv(fresh, ship)),
                columns=ORDER_COLUMNS,
                format="csv",
            )
            await conn.copy_records_to_table(
                "order_items", columns=ITEM_COLUMNS, records=_item_rows(fresh, snapshots)
            )
            await conn.copy_records_to_table(
                "inventory_ledger", columns=LEDGER_COLUMNS, records=_ledger_rows(fresh)
            )
    except asyncpg.UniqueViolationError:
        return False
    return True


async def _insert(
    conn: Conn, fresh: list[OrderEvent], ship: shipping.Shipping
) -> list[asyncpg.Record]:
    """Orders (as payable), items and ledger rows; returns the order ids that were new."""
    new = await conn.fetch(SQL_INSERT_ORDERS, *_order_columns(fresh, ship))
    new_ids = {r["id"] for r in new}
    fresh = [e for e in fresh if e.order_id in new_ids]
    if fresh:
        items = _item_rows(fresh, ship.snapshots_of(fresh))
        await conn.execute(SQL_INSERT_ITEMS, *_columns(items))
        await conn.execute(SQL_INSERT_LEDGER, *_columns(_ledger_rows(fresh)))
    return new


async def _count_units(conn: Conn, fresh: list[OrderEvent]) -> list[OrderEvent]:
    """The serialised step, last in the transaction: under the sale rows' locks (in id
    order) each new order takes units from what the record has left, or is turned into
    ``oversold`` (no ledger row); one counter UPDATE per sale. Returns the oversold."""
    unsold = {
        r["id"]: r["unsold"]
        for r in await conn.fetch(SQL_LOCK_SALES, sorted({e.sale_id for e in fresh}))
    }
    per_sale: dict[int, int] = defaultdict(int)
    oversold: list[OrderEvent] = []
    for e in fresh:
        if unsold.get(e.sale_id, 0) >= e.quantity:
            unsold[e.sale_id] -= e.quantity
            per_sale[e.sale_id] += e.quantity
        else:
            oversold.append(e)
    if oversold:
        ids = [e.order_id for e in oversold]
        await conn.execute(SQL_MARK_OVERSOLD, ids, OVERSOLD)
        await conn.execute(SQL_UNLEDGER, ids)
    for sale_id in sorted(per_sale):
        await conn.execute(SQL_SALE_SOLD, sale_id, per_sale[sale_id])
    return oversold


class OrderBatchProcessor:
    """Everything between "a batch arrived" and "its offsets may be committed"."""

    def __init__(
        self,
        settings: Settings,
        db: asyncpg.Pool,
        redis: Redis,
        dlq: OrderProducer,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.dlq = dlq
        self.metrics = metrics
        self._claim = register(redis, "claim")
        self._release = register(redis, "release")
        self._buckets: dict[int, int] = {}  # sale id -> its bucket count (fixed at create)

    def _home(self, e: OrderEvent) -> int:
        """The bucket holding ``e``'s reservation: its shopper's home bucket."""
        return buckets.home(e.user_id, self._buckets.get(e.sale_id, 1))

    async def _check_rules(
        self, events: list[tuple[ConsumerRecord[bytes, bytes], OrderEvent]], out: BatchOutcome
    ) -> list[tuple[ConsumerRecord[bytes, bytes], OrderEvent]]:
        sale_ids = sorted({e.sale_id for _, e in events})
        user_ids = sorted({e.user_id for _, e in events})
        async with self.db.acquire() as conn:
            sales = {r["id"]: r for r in await conn.fetch(SQL_SALES, sale_ids)}
            users = {r["id"] for r in await conn.fetch(SQL_USERS, user_ids)}
        self._buckets.update((sid, r["buckets"]) for sid, r in sales.items())
        ok: list[tuple[ConsumerRecord[bytes, bytes], OrderEvent]] = []
        for rec, e in events:
            sale = sales.get(e.sale_id)
            if sale is None:
                out.dead.append((rec, f"unknown sale {e.sale_id}"))
            elif sale["sku_id"] != e.sku_id or sale["product_id"] != e.product_id:
                out.dead.append((rec, f"sku/product do not match sale {e.sale_id}"))
            elif e.user_id not in users:
                out.dead.append((rec, f"unknown user {e.user_id}"))
            else:
                ok.append((rec, e))
                continue
            out.broken.append(e)
        return ok

    async def _claim_all(self, events: list[OrderEvent]) -> tuple[list[OrderEvent], int]:
        by_bucket: dict[tuple[int, int], list[OrderEvent]] = defaultdict(list)
        for e in events:
            by_bucket[e.sale_id, self._home(e)].append(e)
        keep: list[OrderEvent] = []
        voided = 0
        for (sale_id, bucket), group in by_bucket.items():
            codes = await self._claim(
                keys=rediskeys.claim_keys(sale_id, bucket),
                args=[e.order_id for e in group],
            )
            for e, code in zip(group, codes, strict=True):
                # NOT_IN_REDIS is kept too: Redis lost it, but a shopper was told yes
                if Claim(int(code)) is Claim.VOIDED:
                    voided += 1
                else:
                    keep.append(e)
        return keep, voided

    async def process(self, records: list[ConsumerRecord[bytes, bytes]]) -> BatchOutcome:
        out = BatchOutcome()
        parsed: list[tuple[ConsumerRecord[bytes, bytes], OrderEvent]] = []
        seen: set[str] = set()
        for rec in records:
            try:
                event = decode(rec.value)
            except BadEvent as exc:
                out.dead.append((rec, str(exc)))
                continue
            if event.order_id in seen:
                out.duplicates += 1
                continue
            seen.add(event.order_id)
            parsed.append((rec, event))
        if parsed:
            valid = await self._check_rules(parsed, out)
            events, out.voided = await self._claim_all([e for _, e in valid])
            try:
                async with self.db.acquire() as conn:
                    written = await persist(conn, events)
            except asyncpg.IntegrityConstraintViolationError:
                written = await self._persist_one_by_one(events, valid, out)
            out.persisted = len(written.new)
            if written.new:
                # One line per batch, order id -> the join's request id: `grep <order id>`
                # finds it next to the gateway's access line for the same request.
                rid = {e.order_id: e.request_id for e in events}
                log.info(
                    "persisted %d order(s)",
                    len(written.new),
                    extra={"orders": {oid: rid.get(oid, "") for oid in written.new}},
                )
            out.duplicates += len(events) - len(written.new)
            out.oversold = written.oversold
            for e in written.oversold:
                log.error(
                    "order %s (sale %d, user %d, %d unit(s)) was accepted beyond the "
                    "sale's allotment: written as oversold, never payable",
                    e.order_id,
                    e.sale_id,
                    e.user_id,
                    e.quantity,
                )
            self.metrics.oversold.inc(len(written.oversold))
            await self._drop_claims(events)
        if out.broken:
            await self._void(out.broken)
        if out.dead:
            await self._dead_letter(out.dead)
        self.metrics.consumed.inc(out.persisted)
        return out

    async def _persist_one_by_one(
        self,
        events: list[OrderEvent],
        valid: list[tuple[ConsumerRecord[bytes, bytes], OrderEvent]],
        out: BatchOutcome,
    ) -> Persisted:
        """A rule the database enforces broke the batch: find the culprit(s), keep the rest."""
        record_of = {e.order_id: rec for rec, e in valid}
        written = Persisted()
        async with self.db.acquire() as conn:
            for e in events:
                try:
                    one = await persist(conn, [e])
                except asyncpg.IntegrityConstraintViolationError as exc:
                    out.dead.append((record_of[e.order_id], f"rejected by the database: {exc}"))
                    continue
                written.new += one.new
                written.oversold += one.oversold
        return written

    async def _drop_claims(self, events: list[OrderEvent]) -> None:
        by_bucket: dict[tuple[int, int], list[str]] = defaultdict(list)
        for e in events:
            by_bucket[e.sale_id, self._home(e)].append(e.order_id)
        pipe = self.redis.pipeline(transaction=False)
        for (sale_id, bucket), ids in by_bucket.items():
            pipe.hdel(rediskeys.claimed(sale_id, bucket), *ids)
            pipe.zrem(rediskeys.claim_times(sale_id, bucket), *ids)
            pipe.hdel(rediskeys.republished(sale_id, bucket), *ids)
        await pipe.execute()

    async def _void(self, events: list[OrderEvent]) -> None:
        """An order that can never be written must not keep its units: release the
        reservation (if it is still in the log) exactly as a failed publish would."""
        for e in events:
            sid = e.sale_id
            released = await self._release(
                keys=rediskeys.release_keys(sid, self._home(e)),
                args=[e.order_id, e.user_id, e.quantity, ""],
            )
            if int(released) == 1:
                log.error("order %s breaks a rule; its reservation was released", e.order_id)

    async def _dead_letter(self, dead: list[tuple[ConsumerRecord[bytes, bytes], str]]) -> None:
        items = []
        for rec, reason in dead:
            log.warning(
                "dead-lettering %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, reason
            )
            self.metrics.dead_letters.labels(reason.split(" ", 1)[0]).inc()
            headers = [
                ("reason", reason.encode()),
                ("source_topic", rec.topic.encode()),
                ("source_partition", str(rec.partition).encode()),
                ("source_offset", str(rec.offset).encode()),
            ]
            items.append((rec.key or b"", rec.value or b"", headers))
        await self.dlq.publish_many(items, topic=self.settings.kafka_dlq_topic)


# The reason label of flashsale_consumer_dead_letters_total is the reason's first word; these
# are the ones the processor writes itself (declared at zero when the consumers start).
DEAD_LETTER_LABELS = ("unknown", "sku/product", "rejected")


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        settings.kafka_orders_topic,
        bootstrap_servers=settings.kafka,
        group_id=settings.kafka_consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_interval_ms=max(60_000, settings.kafka_session_timeout_ms * 2),
        rebalance_timeout_ms=settings.kafka_session_timeout_ms * 2,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        partition_assignment_strategy=assignor(settings),
        client_id="flashsale-consumer",
    )


async def consume_forever(
    settings: Settings, processor: OrderBatchProcessor, stop: asyncio.Event, *, on_batch: Any = None
) -> None:
    """Poll, process, commit; retry a batch with backoff while a store is down."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        while not stop.is_set():
            polled_ms = int(time.time() * 1000)
            try:
                batches = await consumer.getmany(
                    timeout_ms=200, max_records=settings.consumer_batch_max
                )
            except KafkaError as exc:  # a broker restart or a rebalance: poll again
                log.warning("poll failed (%s); retrying", exc)
                await asyncio.sleep(POLL_RETRY_S)
                continue
            records = [rec for recs in batches.values() for rec in recs]
            if records:
                attempt = 0
                while True:
                    try:
                        # a Redis connection closed under a command during a failover is a
                        # store out of reach like any other (redis-py#4287), not the end of
                        # the consumer
                        with leaks_as_connection_errors():
                            outcome = await processor.process(records)
                        break
                    except Exception as exc:
                        if not _retriable(exc):
                            raise
                        delay = BATCH_RETRY_BACKOFF_S[min(attempt, len(BATCH_RETRY_BACKOFF_S) - 1)]
                        log.warning(
                            "batch of %d failed (%s: %s); retrying in %.1fs",
                            len(records),
                            type(exc).__name__,
                            exc,
                            delay,
                        )
                        attempt += 1
                        await asyncio.sleep(delay)
                try:
                    await consumer.commit()
                except KafkaError as exc:
                    # e.g. the group rebalanced: the partition's new owner gets the batch
                    # again, and writing it again changes nothing
                    log.warning("offset commit failed (%s); the batch will be replayed", exc)
                if on_batch is not None:
                    on_batch(outcome)
            await _record_progress(consumer, processor, polled_ms, batches)
    finally:
        await consumer.stop()


async def _record_progress(
    consumer: AIOKafkaConsumer,
    processor: OrderBatchProcessor,
    polled_ms: int,
    batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
) -> None:
    """The lag of each assigned partition, and how far the group has read it: up to the
    poll's start once nothing is left behind its fetched end, else up to the last record
    written. The stranded sweeper republishes only what every partition has been read past
    (``consumers/sweepers.py``): an event still waiting in the topic is not stranded."""
    marks: dict[int, int] = {}
    for tp in consumer.assignment():
        assert isinstance(tp, TopicPartition)
        high = consumer.highwater(tp)  # end_offsets() is wrong on tansu after batched produce
        if high is None:
            continue
        lag = max(0, high - await consumer.position(tp))
        processor.metrics.consumer_lag.labels(str(tp.partition)).set(lag)
        if lag == 0:
            marks[tp.partition] = polled_ms
        elif records := batches.get(tp):
            marks[tp.partition] = max(rec.timestamp for rec in records)
    if not marks:
        return
    try:
        with leaks_as_connection_errors():
            await processor.redis.hset(
                rediskeys.drained(processor.settings.kafka_orders_topic),
                mapping=marks,  # type: ignore[arg-type]
            )
    except STORE_ERRORS as exc:  # the next poll writes again; until then the sweeper waits
        log.debug("could not record the read position (%s)", exc)
