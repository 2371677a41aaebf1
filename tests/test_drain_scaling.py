"""One hot sale drained by many consumers: events spread over every partition, the sale
row is locked only for the transaction's last step, and still no accepted order is
dropped, none is counted twice, and the orders beyond the allotment end ``oversold``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from redis.asyncio import Redis

from consumers.order_events import (
    SQL_LOCK_SALES,
    BatchOutcome,
    OrderBatchProcessor,
    consume_forever,
    persist,
)
from consumers.recovery import unconsumed_events
from flashsale.auth import TokenService
from flashsale.dashboard.snapshot import SQL_ORDERS_BY_STATUS
from flashsale.flash.events import OrderEvent
from flashsale.settings import Settings
from flashsale.stores.kafka import OrderProducer, ensure_topics, group_state
from flashsale.stores.metrics import get_metrics
from tests.faultkit import leaked_transport_error
from tests.flashkit import (
    admin_headers,
    count_orders,
    create_sale,
    eventually,
    forget_sale,
    make_sku,
    make_users,
)

pytestmark = pytest.mark.integration

SQL_STATUSES = """
SELECT o.status, count(*) AS orders, sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1 GROUP BY o.status
"""
SQL_SALE = "SELECT sold_quantity FROM flash_sales WHERE id = $1"
SQL_LEDGER = """
SELECT count(*) AS rows, coalesce(-sum(delta), 0)::int AS units FROM inventory_ledger
WHERE flash_sale_id = $1 AND reason = 'flash_sold'
"""
SQL_WRITE_LOCKS = """
SELECT relation::regclass::text AS relation FROM pg_locks
WHERE pid = $1 AND granted AND mode = 'RowExclusiveLock' AND locktype = 'relation'
"""
SQL_LEDGER_OF_OVERSOLD = """
SELECT count(*) FROM inventory_ledger l JOIN orders o ON o.id = l.order_id
WHERE o.flash_sale_id = $1 AND o.status = 'oversold'
"""


def isolated(settings: Settings) -> Settings:
    """The session's settings with a topic and a consumer group of this test's own."""
    tag = secrets.token_hex(4)
    return settings.with_(
        kafka_orders_topic=f"test.drain.{tag}",
        kafka_dlq_topic=f"test.drain.dlq.{tag}",
        kafka_consumer_group=f"test-drain-{tag}",
    )


HotSale = Callable[[int], Awaitable[tuple[int, int, int]]]


@pytest.fixture
async def hot_sale(
    client: TestClient[Any, Any], db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> AsyncIterator[HotSale]:
    """Makes live sales, returning (sale id, sku id, product id); removes them afterwards
    from both stores, so that the orders these tests write beyond an allotment on purpose
    never meet another test's reconcile."""
    made: list[int] = []

    async def make(quantity: int) -> tuple[int, int, int]:
        sku = await make_sku(db)
        sale_id = await create_sale(
            client, await admin_headers(db, tokens), sku, quantity=quantity, limit=5
        )
        made.append(sale_id)
        product = await db.fetchval("SELECT product_id FROM skus WHERE id = $1", sku)
        return sale_id, sku, int(product)

    yield make
    for sale_id in made:
        await forget_sale(db, redis, sale_id)


def events_for(
    sale_id: int, sku: int, product: int, users: list[int], n: int, *, base: int
) -> list[OrderEvent]:
    now_ms = int(time.time() * 1000)
    return [
        OrderEvent(
            order_id=str(base + i),
            sale_id=sale_id,
            user_id=users[i % len(users)],
            sku_id=sku,
            product_id=product,
            quantity=1 + i % 2,
            price_cents=500,
            payment_deadline_ms=now_ms + 900_000,
            reserved_at_ms=now_ms,
        )
        for i in range(n)
    ]


async def record_of(db: asyncpg.Pool, sale_id: int) -> dict[str, Any]:
    statuses = {
        r["status"]: (r["orders"], r["units"]) for r in await db.fetch(SQL_STATUSES, sale_id)
    }
    ledger = await db.fetchrow(SQL_LEDGER, sale_id)
    assert ledger is not None
    return {
        "statuses": statuses,
        "sold": await db.fetchval(SQL_SALE, sale_id),
        "ledger_rows": ledger["rows"],
        "ledger_units": ledger["units"],
        "ledger_of_oversold": await db.fetchval(SQL_LEDGER_OF_OVERSOLD, sale_id),
    }


async def publish_in_waves(producer: OrderProducer, events: list[OrderEvent]) -> None:
    """As a gateway under load does: concurrent joins, shipped in many batches."""
    for i in range(0, len(events), 10):
        await asyncio.gather(*(producer.publish(e.key, e.encode()) for e in events[i : i + 10]))


def test_one_sales_events_are_keyed_by_order() -> None:
    a, b = (OrderEvent(str(n), 7, 1, 1, 1, 1, 100, 0, 0) for n in (1_000_001, 1_000_002))
    assert a.key == b"1000001" and b.key == b"1000002"


async def test_one_sale_spreads_over_every_partition_and_recovery_reads_them_all(
    base_settings: Settings, db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    settings = isolated(base_settings)
    sale_id, sku, product = await hot_sale(1000)
    users = await make_users(db, 10)
    events = events_for(sale_id, sku, product, users, 200, base=int(time.time()) * 10_000)
    async with OrderProducer(settings) as producer:
        await publish_in_waves(producer, events)

    consumer = AIOKafkaConsumer(
        settings.kafka_orders_topic,
        bootstrap_servers=settings.kafka,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    per_partition: Counter[int] = Counter()
    try:
        deadline = time.monotonic() + 30
        while sum(per_partition.values()) < len(events) and time.monotonic() < deadline:
            for tp, recs in (await consumer.getmany(timeout_ms=300)).items():
                per_partition[tp.partition] += len(recs)
    finally:
        await consumer.stop()
    assert sum(per_partition.values()) == len(events)
    assert set(per_partition) == set(range(settings.kafka_partitions)), per_partition

    # the fence's recount reads past the group's offsets on every partition
    seen = await unconsumed_events(settings)
    assert sorted(e.order_id for e in seen) == sorted(e.order_id for e in events)


async def test_concurrent_batches_of_one_sale_count_each_order_once(
    db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    quantity = 90
    sale_id, sku, product = await hot_sale(quantity)
    users = await make_users(db, 20)
    events = events_for(sale_id, sku, product, users, 100, base=int(time.time()) * 10_000)
    units = sum(e.quantity for e in events)  # 150 units offered for 90
    # four consumers at once, each batch overlapping the next one (a rebalance replay)
    batches = [events[i : i + 30] for i in range(0, 100, 25)]

    async def one(batch: list[OrderEvent]) -> Any:
        async with db.acquire() as conn:
            return await persist(conn, batch)

    results = await asyncio.gather(*(one(b) for b in batches))
    new = [oid for r in results for oid in r.new]
    assert sorted(new) == sorted(e.order_id for e in events)  # every order, once
    oversold = {e.order_id for r in results for e in r.oversold}

    got = await record_of(db, sale_id)
    pending_orders, pending_units = got["statuses"]["pending_payment"]
    oversold_orders, oversold_units = got["statuses"]["oversold"]
    assert pending_orders + oversold_orders == len(events)
    assert pending_units + oversold_units == units
    assert oversold_orders == len(oversold)
    # the record is filled exactly; only an order that no longer fits is oversold
    assert got["sold"] == pending_units == got["ledger_units"]
    assert quantity - 1 <= pending_units <= quantity
    assert got["ledger_rows"] == pending_orders and got["ledger_of_oversold"] == 0
    # the dashboard's counters (kept by triggers, the overlapping COPYs rolled back)
    counters = await db.fetch(SQL_ORDERS_BY_STATUS, sale_id)
    assert {r["status"]: r["n"] for r in counters} == {
        "pending_payment": pending_orders,
        "oversold": oversold_orders,
    }

    replayed = await asyncio.gather(*(one(b) for b in reversed(batches)))
    assert all(not r.new and not r.oversold for r in replayed)
    assert await record_of(db, sale_id) == got


SQL_MERCHANT_ROWS = """
SELECT mo.order_id, mo.units, mo.amount_cents FROM merchant_orders mo
JOIN orders o ON o.id = mo.order_id WHERE o.flash_sale_id = $1 ORDER BY mo.order_id
"""
SQL_ITEM_ROWS = """
SELECT count(*) FROM order_items i JOIN orders o ON o.id = i.order_id WHERE o.flash_sale_id = $1
"""


async def test_an_order_another_consumer_writes_meanwhile_is_kept_once(
    db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    """The batch write's fast path assumes the orders it checked are still new; one that
    another transaction writes between the check and the write (a rebalance replay) sends
    the batch to the ON CONFLICT path: every order once, with one item, one ledger row and
    one merchant row, and the sale counts each unit once."""
    sale_id, sku, product = await hot_sale(100)
    users = await make_users(db, 5)
    events = events_for(sale_id, sku, product, users, 20, base=int(time.time()) * 10_000 + 8000)
    async with db.acquire() as other, db.acquire() as conn:
        tx = other.transaction()
        await tx.start()
        first = await persist(other, events[7:8])  # written, not yet committed
        task = asyncio.create_task(persist(conn, events))

        async def waits_on_it() -> bool:
            return bool(
                await other.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    conn.get_server_pid(),
                )
            )

        try:
            await eventually(waits_on_it, timeout_s=20)  # past its check, at the write
        finally:
            await tx.commit()
        written = await task
    assert first.new == [events[7].order_id]
    assert sorted(written.new) == sorted(e.order_id for i, e in enumerate(events) if i != 7)
    assert not written.oversold
    got = await record_of(db, sale_id)
    units = sum(e.quantity for e in events)
    assert got["statuses"] == {"pending_payment": (20, units)}
    assert got["sold"] == units == got["ledger_units"] and got["ledger_rows"] == 20
    assert await db.fetchval(SQL_ITEM_ROWS, sale_id) == 20
    merchant = [tuple(r) for r in await db.fetch(SQL_MERCHANT_ROWS, sale_id)]
    assert merchant == sorted((e.order_id, e.quantity, e.quantity * 500) for e in events)


async def test_a_row_the_database_refuses_fails_the_whole_batch_write(
    db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    """What the processor's one-by-one retry relies on: a batch with one order the
    database refuses (here its shopper is gone) raises an integrity error and leaves no
    row of the batch behind; the others, written again without it, are kept."""
    sale_id, sku, product = await hot_sale(100)
    users = await make_users(db, 3)
    events = events_for(sale_id, sku, product, users, 6, base=int(time.time()) * 10_000 + 9500)
    gone = max(users) + 1_000_000
    bad = replace(events[3], user_id=gone)
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await persist(conn, [*events[:3], bad, *events[4:]])
        assert await count_orders(db, sale_id) == 0
        ledger = await db.fetchrow(SQL_LEDGER, sale_id)
        assert ledger is not None and ledger["rows"] == 0
        kept = await persist(conn, [*events[:3], *events[4:]])
    assert sorted(kept.new) == sorted(e.order_id for i, e in enumerate(events) if i != 3)
    assert await db.fetchval(SQL_ITEM_ROWS, sale_id) == 5


async def test_items_added_by_a_second_statement_grow_the_merchant_row(
    db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    """The merchant rows kept by the statement trigger: a new order gets one row per
    merchant, and items a later statement adds to it add to that row."""
    sale_id, sku, product = await hot_sale(100)
    users = await make_users(db, 1)
    events = events_for(sale_id, sku, product, users, 1, base=int(time.time()) * 10_000 + 9000)
    async with db.acquire() as conn:
        assert (await persist(conn, events)).new == [events[0].order_id]
        await conn.execute(
            "INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents) "
            "SELECT $1, $2, $3, q, 700 FROM unnest('{2,3}'::int[]) AS q",
            events[0].order_id,
            product,
            sku,
        )
    merchant = [tuple(r) for r in await db.fetch(SQL_MERCHANT_ROWS, sale_id)]
    assert merchant == [(events[0].order_id, 1 + 5, 500 + 5 * 700)]


async def test_a_consumer_waits_for_the_sale_row_only_after_its_writes(
    db: asyncpg.Pool, hot_sale: HotSale
) -> None:
    sale_id, sku, product = await hot_sale(100)
    users = await make_users(db, 5)
    events = events_for(sale_id, sku, product, users, 20, base=int(time.time()) * 10_000 + 5000)
    async with db.acquire() as holder, db.acquire() as conn:
        tx = holder.transaction()
        await tx.start()
        await holder.fetch(SQL_LOCK_SALES, [sale_id])  # another consumer's last step
        pid = conn.get_server_pid()
        task = asyncio.create_task(persist(conn, events))
        try:

            async def waits_on_lock() -> bool:
                row = await holder.fetchrow(
                    "SELECT wait_event_type, query FROM pg_stat_activity WHERE pid = $1", pid
                )
                return row is not None and row["wait_event_type"] == "Lock"

            await eventually(waits_on_lock, timeout_s=20)
            # its orders, items and ledger rows are written: it holds their tables' write
            # locks while it waits for the one serialised step
            tables = {r["relation"] for r in await holder.fetch(SQL_WRITE_LOCKS, pid)}
            assert {"orders", "order_items", "inventory_ledger"} <= tables, tables
            assert not task.done()
        finally:
            await tx.commit()
        written = await task
    assert len(written.new) == 20 and not written.oversold
    assert await db.fetchval(SQL_SALE, sale_id) == sum(e.quantity for e in events)


async def test_two_consumers_in_one_group_drain_one_sale_together(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, hot_sale: HotSale
) -> None:
    settings = isolated(base_settings)
    quantity = 240
    sale_id, sku, product = await hot_sale(quantity)
    users = await make_users(db, 20)
    events = events_for(sale_id, sku, product, users, 200, base=int(time.time()) * 10_000 + 7000)
    units = sum(e.quantity for e in events)  # 300 units offered for 240
    stop = asyncio.Event()
    batches: dict[str, list[BatchOutcome]] = {"a": [], "b": []}
    async with OrderProducer(settings) as producer:
        processor = OrderBatchProcessor(settings, db, redis, producer, get_metrics())
        tasks = [
            asyncio.create_task(
                consume_forever(settings, processor, stop, on_batch=batches[name].append)
            )
            for name in batches
        ]
        try:
            # the group settles with both members before the events arrive
            await eventually(lambda: _stable_with(settings, 2), timeout_s=60, every_s=0.3)
            await publish_in_waves(producer, events)
            await eventually(lambda: _equals(count_orders(db, sale_id), len(events)), timeout_s=60)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
    got = await record_of(db, sale_id)
    pending_orders, pending_units = got["statuses"]["pending_payment"]
    oversold_orders, oversold_units = got["statuses"]["oversold"]
    assert pending_orders + oversold_orders == len(events)
    assert pending_units + oversold_units == units
    assert got["sold"] == pending_units == got["ledger_units"]
    assert quantity - 1 <= pending_units <= quantity
    assert sum(o.persisted for b in batches.values() for o in b) == len(events)
    assert all(batches.values()), "both consumers took a share of the one sale"


class LosesItsConnectionOnce(OrderBatchProcessor):
    """A processor whose first batch meets a Redis connection closed under its write, as
    the claim did in a cluster failover (the consumer died of it: the sale stayed
    "recovering", since its recovery runs in the consumer)."""

    failed = 0

    async def process(self, records: Any) -> BatchOutcome:
        if not self.failed:
            self.failed += 1
            raise await leaked_transport_error()
        return await super().process(records)


async def test_a_batch_whose_redis_connection_was_closed_under_it_is_retried(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, hot_sale: HotSale
) -> None:
    settings = isolated(base_settings)
    sale_id, sku, product = await hot_sale(50)
    users = await make_users(db, 10)
    events = events_for(sale_id, sku, product, users, 10, base=int(time.time()) * 10_000 + 8000)
    stop = asyncio.Event()
    async with OrderProducer(settings) as producer:
        await ensure_topics(settings)
        processor = LosesItsConnectionOnce(settings, db, redis, producer, get_metrics())
        task = asyncio.create_task(consume_forever(settings, processor, stop))
        try:
            await publish_in_waves(producer, events)
            await eventually(lambda: _equals(count_orders(db, sale_id), len(events)), timeout_s=60)
            assert processor.failed == 1 and not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    got = await record_of(db, sale_id)
    assert got["sold"] == sum(e.quantity for e in events) == got["ledger_units"]


SQL_WAITING_FOR_USERS = """
SELECT pid FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND query LIKE '%FROM users WHERE id = ANY%'
"""


@pytest.mark.parametrize("intervention", ["pg_cancel_backend", "pg_terminate_backend"])
async def test_a_batch_whose_statement_an_operator_ends_is_retried(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, hot_sale: HotSale, intervention: str
) -> None:
    """An operator cancels the batch's statement (``pg_cancel_backend``; a server-side
    statement or lock timeout answers the same 57014, QueryCanceledError, which is no
    connection error by its class: it ended the consumer) or ends its session (a restart
    of PostgreSQL, ``pg_terminate_backend``). The consumer tries the batch again, as the
    gateway answers 503 for the same errors."""
    settings = isolated(base_settings)
    sale_id, sku, product = await hot_sale(50)
    users = await make_users(db, 10)
    events = events_for(sale_id, sku, product, users, 10, base=int(time.time()) * 10_000 + 8500)
    stop = asyncio.Event()
    async with OrderProducer(settings) as producer, db.acquire() as holder:
        await ensure_topics(settings)
        processor = OrderBatchProcessor(settings, db, redis, producer, get_metrics())
        task = asyncio.create_task(consume_forever(settings, processor, stop))
        try:
            tx = holder.transaction()
            await tx.start()
            # the batch's first read (who the shoppers are) waits here, outside any transaction
            await holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            await publish_in_waves(producer, events)

            async def waiting() -> bool:  # asked on another session: pg_stat_activity is
                return bool(await db.fetch(SQL_WAITING_FOR_USERS))  # frozen in a transaction

            await eventually(waiting, timeout_s=30)
            (pid,) = [r["pid"] for r in await db.fetch(SQL_WAITING_FOR_USERS)]
            assert await db.fetchval(f"SELECT {intervention}($1)", pid)
            await asyncio.sleep(0.5)
            await tx.commit()
            await eventually(lambda: _equals(count_orders(db, sale_id), len(events)), timeout_s=60)
            assert not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    got = await record_of(db, sale_id)
    assert got["sold"] == sum(e.quantity for e in events) == got["ledger_units"]


async def _stable_with(settings: Settings, members: int) -> bool:
    return await group_state(settings) == ("Stable", members)


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_topics_are_created_with_the_replication_settings(base_settings: Settings) -> None:
    settings = isolated(base_settings).with_(
        kafka_replication_factor=3, kafka_min_insync_replicas=2
    )
    await ensure_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka)
    await admin.start()
    try:
        described = await admin.describe_topics([settings.kafka_orders_topic])
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.kafka_orders_topic)]
        )
    finally:
        await admin.close()
    partitions = described[0]["partitions"]
    assert len(partitions) == settings.kafka_partitions
    # tansu lists the one broker three times: it stores, and does not replicate, the data
    assert all(len(p["replicas"]) == 3 for p in partitions)
    entries = {c[0]: c[1] for r in configs for res in r.resources for c in res[4]}
    assert entries.get("min.insync.replicas") == "2", entries
