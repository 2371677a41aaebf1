"""Fault injection: real valkey, broker, gateway and consumer processes killed, stopped and
restarted mid-sale, with every answer a shopper got recorded. After each fault:

- every order a shopper was told was accepted is in PostgreSQL exactly once,
- sold ≤ quantity, sold = the units of the live orders, no order is written "oversold",
- nothing is left in flight (no order stuck "queued"), reconcile is clean — within the
  bound ``settle_and_judge`` states, or the test fails with the state it was left in,
- and the stack answers again by itself.

One case of each fault class runs in ``make test``; the long ones are marked ``chaos``
(``make chaos``). Each holds a row of the table "What survives what" in docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.redisclient import open_redis
from stack.embedded import ValkeyCluster, start_postgres
from tests.faultkit import (
    Answers,
    FaultStack,
    aof_tail,
    assert_promises_kept,
    child_pids,
    crowd_until,
    sale_and_shoppers,
    settle_and_judge,
    stampede,
    when,
)
from tests.flashkit import GatewayServer, admin_headers, make_sku, make_users

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# A failover test's own bounds (the stack, a 60 s crowd of 15 s requests, a 90 s settle)
# add up past the suite's 120 s: a slow failover is judged by the test's own assertions
# rather than killed with the whole run.
FAILOVER_TIMEOUT = pytest.mark.timeout(240)


# a session waiting for a lock the given backend holds (the consumer, blocked on the sale row)
SQL_WAITING_FOR_ROW = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"


@pytest.fixture
async def root() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flashsale-fault-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _stack(base: Settings, root: Path, tag: str, **changes: Any) -> FaultStack:
    stack = FaultStack.start(base, root, tag, **changes)
    try:
        await stack.ready()
    except BaseException:
        stack.stop()
        raise
    return stack


async def _sale(
    stack: FaultStack,
    db: asyncpg.Pool,
    tokens: TokenService,
    quantity: int,
    shoppers: int,
    buckets: int = 1,
) -> tuple[int, list[tuple[int, str]]]:
    return await sale_and_shoppers(
        stack.base_url,
        db,
        tokens,
        quantity=quantity,
        shoppers=shoppers,
        admin_headers=lambda: admin_headers(db, tokens),
        make_sku=lambda: make_sku(db, on_hand=quantity),
        make_users=lambda n: make_users(db, n),
        buckets=buckets,
    )


async def test_redis_loses_its_last_second(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """SIGKILL valkey mid-sale, drop what it wrote in the last second (a host crash, a
    failover to a lagging replica), restart it on its folder and port."""
    stack = await _stack(base_settings, root, "redisloss")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        sale_id, shoppers = await _sale(stack, db, tokens, quantity=300, shoppers=900)
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=300, accepted=80)
        aof, mark = aof_tail(root / "redis")
        await when(lambda: len(answers.accepted) >= 160)
        await redis.aclose()
        stack.kill_redis()
        fault_at = time.monotonic()
        size = aof.stat().st_size
        with aof.open("r+b") as f:  # lose every write since the mark
            f.truncate(mark)
        stack.start_redis_again()
        redis = Redis.from_url(stack.settings.redis)
        assert int(await redis.hget(rediskeys.sale(sale_id), "remaining") or 0) > 0
        await crowd
        verdict = await settle_and_judge(
            f"Redis lost {size - mark} bytes of AOF",
            db,
            redis,
            sale_id,
            answers,
            fault_at,
            stack=stack,
        )
        assert_promises_kept(verdict, answers, stack)
        # every unit sold, none twice: the crowd was three times the stock
        assert verdict.accepted == 300, answers.statuses
        assert answers.statuses.get("503 SALE_RECOVERING", 0) > 0
    finally:
        await redis.aclose()
        stack.stop()


async def test_consumer_killed_between_claim_and_commit_and_broker_wiped(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """The consumer claims a batch in Redis, then dies before its PostgreSQL commit; the
    memory-only broker restarts and forgets the events. The claims age out and are
    republished; every accepted order is written once."""
    stack = await _stack(base_settings, root, "claim")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        sale_id, shoppers = await _sale(stack, db, tokens, quantity=60, shoppers=60)
        # hold the sale row so that the consumer blocks inside its transaction, after the claim
        blocker = await db.acquire()
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM flash_sales WHERE id = $1 FOR UPDATE", sale_id)
            answers = Answers()
            await stampede(stack.base_url, sale_id, shoppers, answers, per_second=200)
            assert len(answers.accepted) == 60
            # the consumer's first batch (all 60 or part of them: however its poll got them)
            # is claimed and its transaction waits for the row
            deadline = time.monotonic() + 60
            while not await db.fetchval(SQL_WAITING_FOR_ROW, blocker.get_server_pid()):
                assert time.monotonic() < deadline, "the consumer never waited for the row"
                await asyncio.sleep(0.05)
            claimed = await redis.hlen(rediskeys.claimed(sale_id))
            assert claimed > 0
            stack.consumer.kill()
            fault_at = time.monotonic()
            await tx.rollback()
        finally:
            await db.release(blocker)
        stack.restart_kafka()
        assert (
            await db.fetchval("SELECT count(*) FROM orders WHERE flash_sale_id = $1", sale_id) == 0
        )
        stack.consumer.start()
        verdict = await settle_and_judge(
            "consumer SIGKILL after claim + broker wiped",
            db,
            redis,
            sale_id,
            answers,
            fault_at,
            stack=stack,
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.persisted == 60
        print(f"claimed when the consumer was killed: {claimed} of 60")
    finally:
        await redis.aclose()
        stack.stop()


async def test_gateway_worker_killed_mid_sale_is_restarted(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """SIGKILL one of two gateway workers under load: `serve` restarts it, its sibling keeps
    answering, and shoppers whose request died with it retry to a final answer."""
    stack = await _stack(base_settings, root, "worker")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        workers = child_pids(stack.gateway.pid)
        assert len(workers) == 2
        sale_id, shoppers = await _sale(stack, db, tokens, quantity=200, shoppers=400)
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=250, accepted=60)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        fault_at = time.monotonic()
        deadline = time.monotonic() + 20
        while True:
            now = child_pids(stack.gateway.pid)
            if len(now) == 2 and victim not in now:
                break
            assert stack.gateway.proc is not None and stack.gateway.proc.poll() is None, (
                "serve stopped after one worker died\n" + stack.log_tail()
            )
            assert time.monotonic() < deadline, "the dead worker was not restarted"
            await asyncio.sleep(0.1)
        await crowd
        verdict = await settle_and_judge(
            "gateway worker SIGKILL", db, redis, sale_id, answers, fault_at, stack=stack
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.accepted == 200
        assert "restarting it" in stack.gateway.log_path.read_text()
    finally:
        await redis.aclose()
        stack.stop()


@pytest.mark.chaos
async def test_redis_restart_with_intact_aof(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    stack = await _stack(base_settings, root, "redisrestart")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        sale_id, shoppers = await _sale(stack, db, tokens, quantity=300, shoppers=900)
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=300, accepted=120)
        await redis.aclose()
        stack.kill_redis()
        fault_at = time.monotonic()
        stack.start_redis_again()
        redis = Redis.from_url(stack.settings.redis)
        await crowd
        verdict = await settle_and_judge(
            "Redis SIGKILL, AOF intact", db, redis, sale_id, answers, fault_at, stack=stack
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.accepted == 300
    finally:
        await redis.aclose()
        stack.stop()


@pytest.mark.chaos
async def test_broker_restart_mid_sale(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """The memory-only broker restarts mid-sale: unconsumed events are gone; the stranded
    and claim sweepers republish what Redis still holds."""
    stack = await _stack(base_settings, root, "brokerrestart")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        sale_id, shoppers = await _sale(stack, db, tokens, quantity=300, shoppers=900)
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=300, accepted=120)
        stack.restart_kafka()
        fault_at = time.monotonic()
        await crowd
        verdict = await settle_and_judge(
            "broker restart (events wiped)", db, redis, sale_id, answers, fault_at, stack=stack
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.accepted == 300
    finally:
        await redis.aclose()
        stack.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("outage_s", [5, pytest.param(30, marks=pytest.mark.chaos)])
async def test_postgres_down(
    base_settings: Settings, tokens: TokenService, root: Path, outage_s: int
) -> None:
    """PostgreSQL stopped mid-sale (5 s in ``make test``, 30 s in ``make chaos``): joins
    keep being accepted into the topic, the sweepers do not flood it, and everything lands
    once PostgreSQL is back."""
    from flashsale.stores.db import create_pool, migrate

    pg = start_postgres(root / "pg", durable=False)
    own = base_settings.with_(database_url=pg.url)
    pool = await create_pool(own.database, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    stack = await _stack(own, root, "pgdown")
    redis: Redis = Redis.from_url(stack.settings.redis)
    try:
        sale_id, shoppers = await _sale(stack, pool, tokens, quantity=300, shoppers=600)
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=100, accepted=50)
        await pool.close()
        pg.stop()
        fault_at = time.monotonic()
        await asyncio.sleep(outage_s)
        pg = start_postgres(root / "pg", port=pg.port, durable=False)
        pool = await create_pool(own.database, min_size=1, max_size=4)
        await crowd
        verdict = await settle_and_judge(
            f"PostgreSQL down {outage_s} s",
            pool,
            redis,
            sale_id,
            answers,
            fault_at,
            timeout_s=90 + outage_s,
            stack=stack,
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.accepted == 300
        republished = stack.consumer.log_path.read_text().count("republished")
        print("republish log lines during the outage:", republished)
    finally:
        await redis.aclose()
        stack.stop()
        await pool.close()
        pg.stop()


async def test_lost_reply_is_outcome_unknown_and_a_retry_finds_the_order(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """Redis stops answering after it ran the script: the shopper is told the outcome is
    unknown (never "no"), and a retry with the same Idempotency-Key answers with the order."""
    from aiohttp.test_utils import TestClient

    from gateway.app import create_app
    from stack.embedded import start_kafka, start_redis

    redis_server = start_redis(root / "r", persist=False)
    kafka = start_kafka(root / "k")
    settings = base_settings.with_(
        redis_url=redis_server.url,
        kafka_bootstrap=kafka.url,
        kafka_orders_topic=f"{base_settings.kafka_orders_topic}.lost",
        data_dir=str(root),
    )
    try:
        async with TestClient(GatewayServer(create_app(settings))) as client:
            admin = await admin_headers(db, tokens)
            sku = await make_sku(db, on_hand=5)
            from tests.flashkit import create_sale

            sale_id = await create_sale(client, admin, sku, quantity=5, limit=1)
            user, warm = await make_users(db, 2)
            warm_up = await client.post(
                f"/api/v1/flash-sales/{sale_id}/join",
                headers={"Authorization": f"Bearer {tokens.issue(warm, 'user')}"},
                json={"quantity": 1},
            )
            assert warm_up.status == 202  # the join path's connection is open
            headers = {
                "Authorization": f"Bearer {tokens.issue(user, 'user')}",
                "Idempotency-Key": "lost-reply",
            }
            url = f"/api/v1/flash-sales/{sale_id}/join"
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                resp = await client.post(url, headers=headers, json={"quantity": 1})
                body = await resp.json()
                assert resp.status == 503 and body["error"] == "OUTCOME_UNKNOWN", body
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            again = await client.post(url, headers=headers, json={"quantity": 1})
            assert again.status == 202
            assert (await again.json())["data"]["order_id"] == body["data"]["order_id"]
            other = await client.post(
                url, headers={**headers, "Idempotency-Key": "another"}, json={"quantity": 1}
            )
            assert other.status == 409  # never a second unit beyond the per-user limit
            assert (await other.json())["error"] == "LIMIT_EXCEEDED"
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        redis_server.stop()
        kafka.stop()


async def _failover(
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    root: Path,
    tag: str,
    buckets: int = 1,
    *,
    only_seed: bool = False,
) -> None:
    stack = await _stack(base_settings, root, tag, redis_shards=3)
    redis: Redis = open_redis(stack.settings)
    try:
        sale_id, shoppers = await _sale(
            stack, db, tokens, quantity=300, shoppers=900, buckets=buckets
        )
        assert isinstance(stack.redis_server, ValkeyCluster)
        cluster = stack.redis_server
        key = rediskeys.sale(sale_id)
        what = "the sale" if buckets == 1 else f"bucket 0 of a sale in {buckets} buckets"
        if only_seed:  # the gateway and the consumer are told of that one node only
            await stack.reconfigure(redis_url=cluster.primary_for(key).url)
            what += ", the only seed node"
        answers, crowd = await crowd_until(stack, sale_id, shoppers, per_second=300, accepted=80)
        killed = stack.kill_primary_of(key)
        fault_at = time.monotonic()
        accepted_at_kill = len(answers.accepted)
        await when(lambda: cluster.primary_for(key).port != killed.port)
        await crowd
        verdict = await settle_and_judge(
            f"SIGKILL of the primary holding {what}",
            db,
            redis,
            sale_id,
            answers,
            fault_at,
            stack=stack,
        )
        assert_promises_kept(verdict, answers, stack)
        assert not [s for s in answers.statuses if s.startswith("500")], answers.statuses
        assert "503 RETRY_LATER without Retry-After" not in answers.statuses, answers.statuses
        assert len(answers.accepted) > accepted_at_kill, answers.statuses  # joins resumed
        # the crowd was three times the stock: the promoted replica sold the rest
        assert verdict.accepted == 300, answers.statuses
    finally:
        await redis.aclose()
        stack.stop()


@FAILOVER_TIMEOUT
async def test_cluster_primary_killed_mid_stampede(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """SIGKILL the valkey primary that holds a hot sale mid-stampede: its replica (which
    WAIT kept up with every answered batch) is promoted, the sale is fenced and re-armed,
    joins resume; every 202 is in PostgreSQL once and sold ≤ quantity."""
    await _failover(base_settings, db, tokens, root, "failover")


@FAILOVER_TIMEOUT
async def test_cluster_seed_primary_killed_mid_stampede(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """``FLASHSALE_REDIS_URL`` names one node, the primary holding the sale, and that node
    is SIGKILLed mid-stampede: the gateway outlives the node it was configured with (its
    slot map comes from every node it has seen, never a partial one), shoppers retrying
    with their key get 503s with Retry-After, never a 500, and the promoted replica sells
    the rest."""
    await _failover(base_settings, db, tokens, root, "seedfail", only_seed=True)


@FAILOVER_TIMEOUT
async def test_cluster_primary_killed_mid_stampede_on_a_bucketed_sale(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path
) -> None:
    """The same fault on a sale split into 6 buckets over the 3 shards: the buckets on the
    killed primary are fenced, the whole sale is recounted and re-armed, joins resume in
    every bucket; every 202 is in PostgreSQL once and the sale sells exactly its stock."""
    await _failover(base_settings, db, tokens, root, "failover-buckets", buckets=6)


@FAILOVER_TIMEOUT
@pytest.mark.parametrize("buckets", [1, pytest.param(6, marks=pytest.mark.chaos)])
async def test_cluster_two_failovers_in_a_row(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, root: Path, buckets: int
) -> None:
    """Kill the sale's primary (bucket 0's, for a split sale); bring the dead node back (it
    rejoins as the new primary's replica, and batches WAIT for it again); then kill the
    promoted primary too."""
    stack = await _stack(base_settings, root, f"failover2-{buckets}", redis_shards=3)
    redis: Redis = open_redis(stack.settings)
    try:
        sale_id, shoppers = await _sale(
            stack, db, tokens, quantity=600, shoppers=1800, buckets=buckets
        )
        # the shoppers keep retrying through both failovers and the rejoin between them,
        # however long a loaded machine takes for each (the test's own waits add up to more
        # than a minute at worst)
        answers, crowd = await crowd_until(
            stack, sale_id, shoppers, per_second=200, accepted=60, deadline_s=200
        )
        assert isinstance(stack.redis_server, ValkeyCluster)
        cluster = stack.redis_server
        key = rediskeys.sale(sale_id)
        first = stack.kill_primary_of(key)
        fault_at = time.monotonic()

        def moment() -> str:
            return (
                f"({time.monotonic() - fault_at:.1f}s after the first kill; "
                f"{len(answers.accepted)} accepted; answers {answers.statuses})\n"
                + stack.log_tail()
            )

        await when(lambda: cluster.primary_for(key).port != first.port, explain=moment)
        cluster.restart(first)
        await asyncio.to_thread(cluster.wait_healthy)  # the old primary is a replica now
        before = len(answers.accepted)
        await when(lambda: len(answers.accepted) >= before + 60, explain=moment)
        second = stack.kill_primary_of(key)
        assert second.port != first.port
        await when(lambda: cluster.primary_for(key).port == first.port, explain=moment)
        await crowd
        verdict = await settle_and_judge(
            "two failovers of the sale's shard" + (f" ({buckets} buckets)" if buckets > 1 else ""),
            db,
            redis,
            sale_id,
            answers,
            fault_at,
            stack=stack,
        )
        assert_promises_kept(verdict, answers, stack)
        assert verdict.accepted == 600, answers.statuses
    finally:
        await redis.aclose()
        stack.stop()
