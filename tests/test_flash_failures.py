"""Failures the pipeline must survive: rate limits, a dead broker, killed processes,
replays, stranded reservations, payment deadlines, a flushed Redis, poison messages."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from consumers import reconcile
from consumers.recovery import server_run_id, unconsumed_events
from consumers.runner import run_consumers
from consumers.sweepers import (
    cancel_expired,
    publish_stranded,
    read_through,
    retire_old_sales,
    return_cancelled_units,
)
from flashsale.auth import TokenService
from flashsale.flash import lifecycle
from flashsale.flash.events import OrderEvent
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.kafka import OrderProducer, ensure_topics
from flashsale.stores.metrics import get_metrics
from flashsale.stores.redisclient import open_redis
from flashsale.stores.scripts import FlashScripts
from gateway import appkeys
from gateway.app import create_app
from gateway.flash_runtime import FLASH
from stack.embedded import (
    Server,
    ValkeyCluster,
    free_port,
    start_kafka,
    start_redis,
    start_redis_cluster,
)
from tests.conftest import auth
from tests.flashkit import (
    GatewayServer,
    admin_headers,
    count_orders,
    create_sale,
    drift_free,
    equals,
    eventually,
    join,
    join_final,
    make_sku,
    make_users,
    remaining_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _own(settings: Settings, tag: str, **changes: Any) -> Settings:
    return settings.with_(
        kafka_orders_topic=f"{settings.kafka_orders_topic}.{tag}",
        kafka_dlq_topic=f"{settings.kafka_dlq_topic}.{tag}",
        kafka_consumer_group=f"{settings.kafka_consumer_group}-{tag}",
        **changes,
    )


@pytest.fixture
async def tmpdir_path() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flashsale-fail-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_rate_limit_triggers_and_recovers(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService
) -> None:
    # a token every 2 s: three requests on a loaded CI machine never span a refill
    settings = base_settings.with_(rate_user_per_s=0.5, rate_user_burst=2)
    async with TestClient(GatewayServer(create_app(settings))) as client:
        admin = await admin_headers(db, tokens)
        sale_id = await create_sale(client, admin, await make_sku(db), quantity=50, limit=50)
        user = auth(tokens, (await make_users(db, 1))[0])
        url = f"/api/v1/flash-sales/{sale_id}/join"
        statuses = [
            (await client.post(url, headers=user, json={"quantity": 1})).status for _ in range(2)
        ]
        assert statuses == [202, 202]
        limited = await client.post(url, headers=user, json={"quantity": 1})
        assert limited.status == 429
        assert (await limited.json())["error"] == "RATE_LIMITED"
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        await asyncio.sleep(retry_after)  # what the answer says is enough
        assert (await client.post(url, headers=user, json={"quantity": 1})).status == 202
        other = auth(tokens, (await make_users(db, 1))[0])  # buckets are per user
        assert (await client.post(url, headers=other, json={"quantity": 1})).status == 202


async def test_broker_down_gives_503_and_stock_back(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, tmpdir_path: Path
) -> None:
    broker = start_kafka(tmpdir_path / "k")
    settings = _own(
        base_settings, "down", kafka_bootstrap=broker.url, kafka_produce_timeout_ms=1500
    )
    try:
        async with TestClient(GatewayServer(create_app(settings))) as client:
            admin = await admin_headers(db, tokens)
            sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=1)
            users = await make_users(db, 10)
            url = f"/api/v1/flash-sales/{sale_id}/join"
            rt = client.app[FLASH]
            ok = await client.post(url, headers=auth(tokens, users[0]), json={"quantity": 1})
            assert ok.status == 202
            broker.stop()
            resp = await client.post(url, headers=auth(tokens, users[1]), json={"quantity": 1})
            assert resp.status == 503
            assert (await resp.json())["error"] == "RETRY_LATER"
            assert await remaining_of(rt.redis, sale_id) == 9
            assert await rt.redis.hget(rediskeys.users(sale_id), str(users[1])) is None
            # the refused order is voided (never to be written); the acked one stands
            assert await rt.redis.scard(rediskeys.voided(sale_id)) == 1
            restarted = start_kafka(tmpdir_path / "k2", port=broker.port)
            try:
                await ensure_topics(settings)
                statuses: list[int] = []

                async def accepted() -> bool:
                    r = await client.post(url, headers=auth(tokens, users[1]), json={"quantity": 1})
                    statuses.append(r.status)
                    return r.status == 202

                await eventually(accepted, timeout_s=30, every_s=0.5)
                assert set(statuses) <= {202, 503}
            finally:
                restarted.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize("retry_key", ["one-attempt", "another-attempt"], ids=["replay", "limit"])
async def test_a_retry_told_yes_keeps_what_its_first_attempt_could_not_publish(
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmpdir_path: Path,
    retry_key: str,
) -> None:
    """A retry is told the order stands while the first attempt still waits for a broker
    that is down: with the same key a replay (202), with another key LIMIT_EXCEEDED naming
    the order the shopper has. The first attempt's compensation may no longer release it:
    it answers OUTCOME_UNKNOWN, the reservation stays in the log (not voided, its unit not
    back on sale), and the stranded sweeper publishes it."""
    broker = start_kafka(tmpdir_path / "k")
    settings = _own(
        base_settings,
        "promised",
        kafka_bootstrap=broker.url,
        kafka_produce_timeout_ms=2500,
        stranded_after_s=1,
        metrics_port=free_port(),
    )
    stop = asyncio.Event()
    consumer_task: asyncio.Task[None] | None = None
    try:
        async with TestClient(GatewayServer(create_app(settings))) as client:
            admin = await admin_headers(db, tokens)
            sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=1)
            user = (await make_users(db, 1))[0]
            url = f"/api/v1/flash-sales/{sale_id}/join"
            keyed = {**auth(tokens, user), "Idempotency-Key": "one-attempt"}
            redis = client.app[FLASH].redis
            broker.stop()
            first = asyncio.create_task(client.post(url, headers=keyed, json={"quantity": 1}))
            await eventually(lambda: equals(redis.hlen(rediskeys.log(sale_id)), 1))
            again = {**keyed, "Idempotency-Key": retry_key}
            retry = await client.post(url, headers=again, json={"quantity": 1})
            told = await retry.json()
            if retry_key == "one-attempt":
                assert retry.status == 202, told
            else:
                assert (retry.status, told["error"]) == (409, "LIMIT_EXCEEDED"), told
            order_id = told["data"]["order_id"]
            assert await redis.hexists(rediskeys.log(sale_id), order_id)
            answer = await first
            assert (answer.status, (await answer.json())["error"]) == (503, "OUTCOME_UNKNOWN")
            # kept: in the log, or already published by a sweeper (another test's consumer
            # shares this Redis and PostgreSQL): claimed, or written
            assert (
                await redis.hexists(rediskeys.log(sale_id), order_id)
                or await redis.hexists(rediskeys.claimed(sale_id), order_id)
                or await count_orders(db, sale_id) == 1
            )
            assert await redis.scard(rediskeys.voided(sale_id)) == 0
            assert await remaining_of(redis, sale_id) == 9
            restarted = start_kafka(tmpdir_path / "k2", port=broker.port)
            try:
                await ensure_topics(settings)
                consumer_task = asyncio.create_task(run_consumers(settings, stop))
                await eventually(lambda: equals(count_orders(db, sale_id), 1), timeout_s=30)
                assert (
                    await db.fetchval("SELECT id FROM orders WHERE flash_sale_id = $1", sale_id)
                    == order_id
                )
            finally:
                stop.set()
                if consumer_task is not None:
                    await asyncio.wait_for(consumer_task, 30)
                restarted.stop()
    finally:
        broker.stop()


def _consumer_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(settings.to_env())
    return subprocess.Popen(
        [sys.executable, "-m", "stack", "consume"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _sale_for_events(db: asyncpg.Pool, redis: Redis, quantity: int) -> asyncpg.Record:
    sku = await make_sku(db, on_hand=quantity)
    scripts = FlashScripts.register(redis)
    now = datetime.now(UTC)
    sale = await lifecycle.create_sale(
        db,
        redis,
        scripts,
        sku_id=sku,
        flash_price=100,
        quantity=quantity,
        per_user_limit=100,
        start_at=now - timedelta(seconds=1),
        end_at=now + timedelta(hours=1),
        payment_window_s=900,
        created_by=None,
    )
    row = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale["flash_sale_id"])
    assert row is not None
    return row


def _events(sale: asyncpg.Record, users: list[int], n: int, prefix: str) -> list[OrderEvent]:
    now = int(datetime.now(UTC).timestamp() * 1000)
    return [
        OrderEvent(
            order_id=f"{prefix}{i:08d}",
            sale_id=sale["id"],
            user_id=users[i % len(users)],
            sku_id=sale["sku_id"],
            product_id=sale["product_id"],
            quantity=1,
            price_cents=100,
            payment_deadline_ms=now + 900_000,
            reserved_at_ms=now,
        )
        for i in range(n)
    ]


async def _produce(settings: Settings, events: list[OrderEvent]) -> None:
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(settings.kafka_orders_topic, e.encode(), key=e.key) for e in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_consumer_killed_mid_batch_loses_and_duplicates_nothing(
    base_settings: Settings,
    db: asyncpg.Pool,
    redis: Redis,
    tmpdir_path: Path,
) -> None:
    n = 30_000
    settings = _own(base_settings, "kill", consumer_batch_max=500, data_dir=str(tmpdir_path))
    sale = await _sale_for_events(db, redis, n)
    users = await make_users(db, 200)
    events = _events(sale, users, n, "9100")
    await _produce(settings, events)
    proc = _consumer_process(settings)
    try:
        await eventually(
            lambda: _more_than(count_orders(db, sale["id"]), 500), timeout_s=60, every_s=0.02
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        partial = await count_orders(db, sale["id"])
        assert partial < n, "the consumer finished before it could be killed"
        proc = _consumer_process(settings)
        await eventually(lambda: equals(count_orders(db, sale["id"]), n), timeout_s=90)
        await _produce(settings, events[:1000])  # the same messages delivered twice
        await eventually(lambda: _all_consumed(settings), timeout_s=60, every_s=0.5)
        assert await count_orders(db, sale["id"]) == n
        assert (
            await db.fetchval("SELECT sold_quantity FROM flash_sales WHERE id = $1", sale["id"])
            == n
        )
        assert (
            await db.fetchval(
                "SELECT count(*) FROM order_items i JOIN orders o ON o.id = i.order_id "
                "WHERE o.flash_sale_id = $1",
                sale["id"],
            )
            == n
        )
        assert (
            await db.fetchval(
                "SELECT count(*) FROM inventory_ledger "
                "WHERE flash_sale_id = $1 AND reason = 'flash_sold'",
                sale["id"],
            )
            == n
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _all_consumed(settings: Settings) -> bool:
    """The consumer group's committed offsets reached the end (highwater) of every
    partition: each event produced so far went through the consumer's transaction."""
    return not await unconsumed_events(settings)


async def _more_than(value: Any, n: int) -> bool:
    return bool(await value > n)


async def test_stranded_reservation_is_published(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
    consumer: None,
) -> None:
    """A gateway that died after the script and before the ack left only a log entry."""
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=1)
    user = (await make_users(db, 1))[0]
    rt = client.app[FLASH]
    order_id = client.app[appkeys.ORDER_IDS].next(user)
    keys = rediskeys.reserve_keys(sale_id, user, "127.0.0.1")
    res = await rt.scripts.reserve(
        keys=keys,
        args=[user, 1, order_id, "", "fp", 5, 10, 100, 100, await server_run_id(redis, sale_id)],
    )
    assert int(res[0]) == 0
    await eventually(lambda: equals(count_orders(db, sale_id), 1), timeout_s=30)
    assert await db.fetchval("SELECT id FROM orders WHERE flash_sale_id = $1", sale_id) == order_id
    assert await redis.hlen(rediskeys.log(sale_id)) == 0
    await eventually(lambda: drift_free(db, redis, sale_id))


async def test_a_reservation_waiting_in_the_topic_is_not_published_again(
    client: TestClient[Any, Any],
    base_settings: Settings,
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
) -> None:
    """An unclaimed reservation older than ``stranded_after_s`` is stranded only once the
    consumers have read every partition past it: during a backlog its event is still in
    the topic, and publishing it again would only add to the backlog."""
    settings = _own(
        base_settings, "read-through", stranded_after_s=1, kafka_produce_timeout_ms=1000
    )
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=1)
    user = (await make_users(db, 1))[0]
    order_id = client.app[appkeys.ORDER_IDS].next(user)
    res = await client.app[FLASH].scripts.reserve(
        keys=rediskeys.reserve_keys(sale_id, user, "127.0.0.1"),
        args=[user, 1, order_id, "", "fp", 5, 10, 100, 100, await server_run_id(redis, sale_id)],
    )
    assert int(res[0]) == 0
    reserved_ms = int(cast(float, await redis.zscore(rediskeys.log_times(sale_id), order_id)))
    marks = rediskeys.drained(settings.kafka_orders_topic)
    metrics = get_metrics()

    async def tries() -> int:
        return int(await redis.hget(rediskeys.republished(sale_id), order_id) or 0)

    async with OrderProducer(settings) as producer:
        partitions = await producer.producer.partitions_for(settings.kafka_orders_topic)
        await asyncio.sleep(
            max(settings.stranded_after_s, settings.kafka_produce_timeout_ms / 1000) + 0.5
        )
        # no consumer has read the topic yet
        assert await read_through(redis, producer) is None
        await publish_stranded(settings, redis, producer, metrics)
        assert await tries() == 0
        # the consumers are a minute behind: its event may be waiting in the topic
        await redis.hset(marks, mapping={p: reserved_ms - 60_000 for p in partitions})
        await publish_stranded(settings, redis, producer, metrics)
        assert await tries() == 0
        # every partition read past it, but one only up to within the producer's bound
        await redis.hset(marks, mapping={p: int(time.time() * 1000) for p in partitions})
        await redis.hset(
            marks, str(min(partitions)), reserved_ms + settings.kafka_produce_timeout_ms // 2
        )
        await publish_stranded(settings, redis, producer, metrics)
        assert await tries() == 0
        # read past it on every partition: it never reached the topic, so it is published
        await redis.hset(marks, mapping={p: int(time.time() * 1000) for p in partitions})
        await publish_stranded(settings, redis, producer, metrics)
        assert await tries() == 1
    await redis.delete(marks)


async def test_the_consumers_record_how_far_they_read(
    base_settings: Settings, redis: Redis, consumer: None
) -> None:
    """Every partition of the orders topic gets a read position from the running consumer,
    the time its last poll started once it was at the end."""
    started_ms = int(time.time() * 1000)
    async with OrderProducer(base_settings) as producer:

        async def read_since_start() -> bool:
            through = await read_through(redis, producer)
            return through is not None and through >= started_ms

        await eventually(read_since_start, timeout_s=30)


async def test_deadline_returns_units_exactly_once_with_concurrent_sweepers(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
    consumer: None,
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=2)
    users = await make_users(db, 3)
    for u in users:
        resp = await join(client, sale_id, auth(tokens, u))
        assert resp.status == 202
    await eventually(lambda: equals(count_orders(db, sale_id), 3))
    await db.execute(
        "UPDATE orders SET payment_deadline = now() - interval '1 second' WHERE flash_sale_id = $1",
        sale_id,
    )
    scripts = FlashScripts.register(redis)
    metrics = get_metrics()
    await asyncio.gather(cancel_expired(db, metrics), cancel_expired(db, metrics))
    await asyncio.gather(*(return_cancelled_units(db, redis, scripts, metrics) for _ in range(3)))

    async def settled() -> bool:
        remaining = await remaining_of(redis, sale_id)
        return remaining == 5 and await redis.hlen(rediskeys.users(sale_id)) == 0

    await eventually(settled, timeout_s=10)
    rows = await db.fetch(
        "SELECT status, flash_units_returned FROM orders WHERE flash_sale_id = $1", sale_id
    )
    assert {(r["status"], r["flash_units_returned"]) for r in rows} == {("cancelled", True)}
    assert await db.fetchval("SELECT sold_quantity FROM flash_sales WHERE id = $1", sale_id) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM inventory_ledger "
            "WHERE flash_sale_id = $1 AND reason = 'flash_cancel'",
            sale_id,
        )
        == 3
    )
    resp = await join(client, sale_id, auth(tokens, users[0]), 2)
    assert resp.status == 202  # the user's count was released too
    await eventually(lambda: drift_free(db, redis, sale_id))


@pytest.mark.parametrize(
    ("shards", "buckets"),
    [(0, 1), (3, 1), (3, 4)],
    ids=["single", "cluster", "cluster-4-buckets"],
)
async def test_rebuild_cache_after_flushall(
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    tmpdir_path: Path,
    shards: int,
    buckets: int,
) -> None:
    own_redis: Server | ValkeyCluster
    if shards:
        own_redis = start_redis_cluster(
            tmpdir_path / "c", shards=shards, persist=False, node_timeout_ms=10_000
        )
    else:
        own_redis = start_redis(tmpdir_path / "r", persist=False)
    settings = _own(
        base_settings,
        f"rebuild{shards}",
        redis_url=own_redis.url,
        redis_cluster=bool(shards),
        redis_wait_replicas=1 if shards else 0,
        data_dir=str(tmpdir_path),
        metrics_port=free_port(),
    )
    stop = asyncio.Event()
    consumer_task = asyncio.create_task(run_consumers(settings, stop))
    redis: Redis = open_redis(settings)
    try:
        async with TestClient(GatewayServer(create_app(settings))) as client:
            admin = await admin_headers(db, tokens)
            sale_id = await create_sale(
                client, admin, await make_sku(db), quantity=50, limit=1, buckets=buckets
            )
            users = await make_users(db, 130)
            url = f"/api/v1/flash-sales/{sale_id}/join"
            first = await asyncio.gather(
                *(
                    client.post(url, headers=auth(tokens, u), json={"quantity": 1})
                    for u in users[:30]
                )
            )
            assert [r.status for r in first] == [202] * 30
            await eventually(lambda: equals(count_orders(db, sale_id), 30))
            await eventually(lambda: drift_free(db, redis, sale_id))
            await redis.flushall()
            # missing (drift), or put back unarmed by the recovery sweeper (recovering)
            assert await reconcile.run(settings, "reconcile", repair=False) in (
                reconcile.DRIFT_EXIT,
                reconcile.RECOVERING_EXIT,
            )
            if buckets > 1:  # another recovery recounting it: rebuild-cache waits for it
                held_ms = settings.kafka_produce_timeout_ms + 1_000 + 1_500  # past the grace
                await redis.set(rediskeys.rearm_lease(sale_id), "elsewhere", px=held_ms)
            assert await reconcile.run(settings, "rebuild-cache", repair=False) == 0
            left = [await remaining_of(redis, sale_id, k) for k in range(buckets)]
            assert sum(left) == 20 and max(left) - min(left) <= 1  # spread over the buckets
            await client.app[FLASH].cache.refresh()
            again = await client.post(url, headers=auth(tokens, users[0]), json={"quantity": 1})
            assert again.status == 409  # per-user counts were rebuilt as well
            rest = await asyncio.gather(
                *(join_final(client, sale_id, auth(tokens, u)) for u in users[30:])
            )
            assert sum(status == 202 for status, _, _ in rest) == 20
            await eventually(lambda: equals(count_orders(db, sale_id), 50))
            await eventually(lambda: drift_free(db, redis, sale_id))
            assert await reconcile.run(settings, "reconcile", repair=False) == 0
            async with aiohttp.ClientSession() as http:  # the consumer's own metrics endpoint
                url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
                async with http.get(url) as resp:
                    text = await resp.text()
            assert "flashsale_consumer_orders_persisted_total" in text
            assert "flashsale_consumer_lag" in text
    finally:
        stop.set()
        await asyncio.wait_for(consumer_task, 30)
        await redis.aclose()
        own_redis.stop()


async def test_poison_message_goes_to_dead_letter(
    client: TestClient[Any, Any],
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    consumer: None,
) -> None:
    await _raw_produce(base_settings, [b"not json", b'{"v": 1, "order_id": "x"}'])
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=1)
    user = (await make_users(db, 1))[0]
    resp = await join(client, sale_id, auth(tokens, user))
    assert resp.status == 202
    await eventually(lambda: equals(count_orders(db, sale_id), 1))  # partition not blocked
    reasons = await _dead_letter_reasons(base_settings)
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("order_id" in r for r in reasons)


async def _raw_produce(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka, acks="all")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(settings.kafka_orders_topic, v, key=b"0")
    finally:
        await producer.stop()


async def _dead_letter_reasons(
    settings: Settings, done: Callable[[list[str]], bool] = lambda r: len(r) >= 2
) -> list[str]:
    reasons: list[str] = []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(settings.kafka_dlq_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        for _ in range(30):
            batch = await consumer.getmany(tp, timeout_ms=300)
            for rec in batch.get(tp, []):
                reasons += [v.decode() for k, v in rec.headers if k == "reason"]
            if done(reasons):
                break
    finally:
        await consumer.stop()
    return reasons


async def test_reservation_that_breaks_a_rule_is_released_not_republished(
    client: TestClient[Any, Any],
    base_settings: Settings,
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
    consumer: None,
) -> None:
    """A stranded reservation whose order can never be written (here: its user is gone)
    goes to the dead-letter topic once and gives its units back."""
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5, limit=1)
    ghost = 2_000_000_000
    rt = client.app[FLASH]
    keys = rediskeys.reserve_keys(sale_id, ghost, "127.0.0.1")
    order_id = client.app[appkeys.ORDER_IDS].next(ghost)
    await rt.scripts.reserve(
        keys=keys,
        args=[
            ghost,
            1,
            order_id,
            "",
            "fp",
            5,
            10,
            100,
            100,
            await server_run_id(rt.redis, sale_id),
        ],
    )
    assert await remaining_of(redis, sale_id) == 4

    async def released() -> bool:
        return (
            await remaining_of(redis, sale_id) == 5
            and await redis.hlen(rediskeys.log(sale_id)) == 0
        )

    await eventually(released, timeout_s=30)
    assert await redis.sismember(rediskeys.voided(sale_id), order_id)
    wanted = f"unknown user {ghost}"
    reasons = await _dead_letter_reasons(base_settings, lambda r: wanted in r)
    assert wanted in reasons
    assert await count_orders(db, sale_id) == 0


async def test_old_sales_leave_the_polled_index(
    client: TestClient[Any, Any], db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=2, limit=1)
    await db.execute(
        "UPDATE flash_sales SET start_at = now() - interval '3 days', "
        "end_at = now() - interval '2 days' WHERE id = $1",
        sale_id,
    )
    assert await redis.sismember(rediskeys.SALES_INDEX, str(sale_id))
    await retire_old_sales(db, redis)
    assert not await redis.sismember(rediskeys.SALES_INDEX, str(sale_id))
    assert await redis.exists(rediskeys.sale(sale_id))  # its state stays readable
