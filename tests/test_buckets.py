"""One hot sale split into buckets on different slots (``flashsale/flash/buckets.py``).

On one Redis node and on a three-shard valkey cluster: a bucketed sale sells exactly its
stock under a stampede that wants far more, never passes the per-user limit, is sold out
only when every bucket is empty; top-up and close spread over the buckets; a transfer
its giver never finished is credited once by the sweeper; a recount (a bucket's data
lost) recomputes the whole sale and refuses transfers of the epoch before it.
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from consumers import reconcile
from consumers.recovery import Recovery
from flashsale.auth import TokenService
from flashsale.flash import buckets
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.metrics import get_metrics
from flashsale.stores.scripts import FlashScripts, Give, Take
from gateway.app import create_app
from gateway.flash_runtime import FLASH
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
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def admin(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return await admin_headers(db, tokens)


def test_home_buckets_spread_evenly_and_shares_add_up() -> None:
    for n in (1, 2, 3, 4, 8, 64):
        counts = collections.Counter(buckets.home(u, n) for u in range(1, 100_001))
        assert set(counts) == set(range(n))
        assert max(counts.values()) <= 1.05 * 100_000 / n, counts
        assert min(counts.values()) >= 0.95 * 100_000 / n, counts
        for q in (0, 1, 7, 1000, 1001, 999_999):
            assert sum(buckets.spread(q, n)) == q
            assert max(buckets.spread(q, n)) - min(buckets.spread(q, n)) <= 1


async def bucket_fields(redis: Redis, sale_id: int, n: int, field: str) -> list[int]:
    return [int(await redis.hget(rediskeys.sale(sale_id, k), field) or 0) for k in range(n)]


async def report_of(db: asyncpg.Pool, redis: Redis, sale_id: int) -> reconcile.SaleReport:
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    return await reconcile.check_sale(db, redis, sale)


@pytest.mark.both_topologies
async def test_bucketed_sale_sells_exactly_its_stock(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
    redis_topology: str,
) -> None:
    """A stampede wanting about five times the stock, in joins of one and two units, on a
    sale of 300 in 6 buckets (limit 2 a shopper): exactly 300 units accepted, every 202
    in PostgreSQL once, nobody over the limit, sold out in every bucket, reconcile clean."""
    n, quantity = 6, 300
    sale_id = await create_sale(
        client, admin, await make_sku(db), quantity=quantity, limit=2, buckets=n
    )
    assert await bucket_fields(redis, sale_id, n, "remaining") == buckets.spread(quantity, n)
    if isinstance(redis, RedisCluster):  # the buckets live on more than one shard
        await redis.initialize()
        nodes = {redis.get_node_from_key(rediskeys.sale(sale_id, k)).name for k in range(n)}
        assert len(nodes) >= 2, nodes
    users = await make_users(db, 500)
    headers = {u: auth(tokens, u) for u in users}
    wants = [(u, 1 + (i % 3 == 0)) for i, u in enumerate(users * 2)]
    random.shuffle(wants)
    results = await asyncio.gather(*(join_final(client, sale_id, headers[u], q) for u, q in wants))
    statuses = collections.Counter((s, e) for s, e, _ in results)
    accepted = {
        oid: q for (_, q), (s, _, oid) in zip(wants, results, strict=True) if s == 202 and oid
    }
    assert sum(accepted.values()) == quantity, statuses
    assert all(s in (202, 409) for s, _, _ in results), statuses
    assert await bucket_fields(redis, sale_id, n, "remaining") == [0] * n
    await eventually(lambda: equals(count_orders(db, sale_id), len(accepted)), timeout_s=60)
    rows = await db.fetch(
        "SELECT o.id, o.user_id, sum(i.quantity)::int AS units FROM orders o "
        "JOIN order_items i ON i.order_id = o.id WHERE o.flash_sale_id = $1 GROUP BY o.id",
        sale_id,
    )
    assert {r["id"]: r["units"] for r in rows} == accepted
    per_user = collections.Counter[int]()
    for r in rows:
        per_user[r["user_id"]] += r["units"]
    assert max(per_user.values()) <= 2
    sale = await db.fetchrow("SELECT sold_quantity FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None and sale["sold_quantity"] == quantity
    view = (await (await client.get(f"/api/v1/flash-sales/{sale_id}")).json())["data"]
    assert view["remaining_quantity"] == 0 and view["sold_quantity"] == quantity
    assert view["status"] == "sold_out"
    await eventually(lambda: drift_free(db, redis, sale_id))
    report = await report_of(db, redis, sale_id)
    assert report.ok and report.buckets == n and report.in_transit == 0, report.line()
    print(f"\nbucketed stampede ({redis_topology}): {dict(statuses)}")


@pytest.mark.both_topologies
async def test_empty_home_bucket_takes_from_the_others_within_the_limit(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
) -> None:
    """Every unit sits in one bucket: shoppers of the others still buy them (a refill),
    the per-user limit still holds, and the sold-out flag waits for the last unit."""
    n = 4
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=8, limit=2, buckets=n)
    # move every unit into bucket 0, as many earlier refills would have
    scripts = FlashScripts.register(redis)
    for k in range(1, n):
        res = await scripts.give(keys=rediskeys.give_keys(sale_id, k), args=[k, 0, 100])
        assert Give(int(res[0])) is Give.GIVEN
        take = await scripts.take(keys=rediskeys.take_keys(sale_id, 0), args=[res[2], res[1]])
        assert Take(int(take)) is Take.CREDITED
        await redis.hdel(rediskeys.transfers_out(sale_id, k), res[2])
    assert await bucket_fields(redis, sale_id, n, "remaining") == [8, 0, 0, 0]
    users = await make_users(db, 40)
    far = [u for u in users if buckets.home(u, n) != 0][:5]
    first = far[0]
    a = await join(client, sale_id, auth(tokens, first), 2)
    assert a.status == 202, await a.text()
    b = await join(client, sale_id, auth(tokens, first), 1)
    assert b.status == 409 and (await b.json())["error"] == "LIMIT_EXCEEDED"
    for u in far[1:4]:
        resp = await join(client, sale_id, auth(tokens, u), 2)
        assert resp.status == 202, await resp.text()
    assert sum(await bucket_fields(redis, sale_id, n, "remaining")) == 0
    last = await join(client, sale_id, auth(tokens, far[4]), 1)
    assert last.status == 409 and (await last.json())["error"] == "SOLD_OUT"
    await app[FLASH].cache.refresh()
    assert app[FLASH].cache.sales[sale_id].sold_out
    await eventually(lambda: equals(count_orders(db, sale_id), 4))
    await eventually(lambda: drift_free(db, redis, sale_id))


@pytest.mark.both_topologies
async def test_bucketed_top_up_and_close_spread_over_the_buckets(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
) -> None:
    n = 3
    sku = await make_sku(db, on_hand=100)
    sale_id = await create_sale(client, admin, sku, quantity=10, limit=1, buckets=n)
    assert await bucket_fields(redis, sale_id, n, "allotment") == [4, 3, 3]
    users = await make_users(db, 4)
    for u in users:
        resp = await join(client, sale_id, auth(tokens, u))
        assert resp.status == 202
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}", headers=admin, json={"add_quantity": 5}
    )
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    assert data["total_quantity"] == 15 and data["remaining_quantity"] == 11
    assert await bucket_fields(redis, sale_id, n, "allotment") == [5, 5, 5]
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 85
    for _ in range(2):  # closing twice returns the unsold units once, from every bucket
        resp = await client.post(f"/api/v1/admin/flash-sales/{sale_id}/close", headers=admin)
        assert resp.status == 200
    assert await bucket_fields(redis, sale_id, n, "remaining") == [0, 0, 0]
    assert sum(await bucket_fields(redis, sale_id, n, "moved_out")) == 11
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 96
    await eventually(lambda: equals(count_orders(db, sale_id), 4))
    await eventually(lambda: drift_free(db, redis, sale_id))


@pytest.mark.both_topologies
async def test_unfinished_transfer_is_credited_once_by_the_sweeper(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    consumer: None,
) -> None:
    """A giver that died between its two steps leaves its log entry: reconcile counts the
    units as in transfer (no drift), the sweeper credits them, once."""
    n = 2
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=10, limit=1, buckets=n)
    scripts = FlashScripts.register(redis)
    res = await scripts.give(keys=rediskeys.give_keys(sale_id, 1), args=[1, 0, 1])
    assert Give(int(res[0])) is Give.GIVEN and int(res[1]) == 3  # half of 5, rounded up
    report = await report_of(db, redis, sale_id)
    assert report.in_transit == 3 and report.drift == 0, report.line()
    await eventually(
        lambda: equals(redis.hlen(rediskeys.transfers_out(sale_id, 1)), 0), timeout_s=15
    )
    assert await bucket_fields(redis, sale_id, n, "remaining") == [8, 2]
    again = await scripts.take(keys=rediskeys.take_keys(sale_id, 0), args=[res[2], res[1]])
    assert Take(int(again)) is Take.ALREADY
    assert await bucket_fields(redis, sale_id, n, "remaining") == [8, 2]
    report = await report_of(db, redis, sale_id)
    assert report.ok and report.in_transit == 0, report.line()


@pytest.mark.both_topologies
async def test_lost_bucket_recounts_the_whole_sale_and_drops_older_transfers(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
    base_settings: Settings,
) -> None:
    """One bucket's keys vanish (its shard lost them): joins answer SALE_RECOVERING, the
    recovery sweeper recounts the sale from PostgreSQL and the orders in flight, each
    shopper's count lands in its home bucket again, and a transfer given before the
    recount is never credited after it."""
    n = 3
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=30, limit=1, buckets=n)
    users = await make_users(db, 60)
    for u in users[:12]:
        assert (await join(client, sale_id, auth(tokens, u))).status == 202
    await eventually(lambda: equals(count_orders(db, sale_id), 12))
    scripts = FlashScripts.register(redis)
    stale = await scripts.give(keys=rediskeys.give_keys(sale_id, 2), args=[2, 0, 1])
    assert Give(int(stale[0])) is Give.GIVEN
    await redis.delete(*rediskeys.all_sale_keys(sale_id, 1))  # bucket 1 lost outright
    victims = [u for u in users[:12] if buckets.home(u, n) == 1]
    await app[FLASH].cache.refresh()
    recovery = Recovery(base_settings, db, redis, get_metrics(), grace_s=0.5)
    await eventually(lambda: _armed(recovery), timeout_s=30)
    assert await bucket_fields(redis, sale_id, n, "remaining") == buckets.spread(18, n)
    late = await scripts.take(keys=rediskeys.take_keys(sale_id, 0), args=[stale[2], stale[1]])
    assert Take(int(late)) is Take.STALE
    assert await bucket_fields(redis, sale_id, n, "remaining") == buckets.spread(18, n)
    await app[FLASH].cache.refresh()
    for u in victims:  # their counts were rebuilt in their home bucket
        resp = await join(client, sale_id, auth(tokens, u))
        assert resp.status == 409 and (await resp.json())["error"] == "LIMIT_EXCEEDED"
    results = await asyncio.gather(
        *(join_final(client, sale_id, auth(tokens, u), 1) for u in users[12:])
    )
    assert sum(s == 202 for s, _, _ in results) == 18
    await eventually(lambda: equals(count_orders(db, sale_id), 30))
    await eventually(lambda: drift_free(db, redis, sale_id))


async def _armed(recovery: Recovery) -> bool:
    await recovery.run_once()
    _, fenced = await recovery.fenced()
    return not fenced


async def test_a_queued_sale_has_one_bucket(
    client: TestClient[Any, Any], db: asyncpg.Pool, admin: dict[str, str]
) -> None:
    sku = await make_sku(db)
    body = {
        "sku_id": sku,
        "flash_price": 100,
        "quantity": 5,
        "per_user_limit": 1,
        "start_at": "2030-01-01T10:00:00Z",
        "end_at": "2030-01-01T11:00:00Z",
    }
    for bad in (0, 65, "4"):
        resp = await client.post(
            "/api/v1/admin/flash-sales", headers=admin, json={**body, "buckets": bad}
        )
        assert resp.status == 422 and "buckets" in (await resp.json())["fields"]
    resp = await client.post(
        "/api/v1/admin/flash-sales",
        headers=admin,
        json={**body, "buckets": 4, "mode": "queued"},
    )
    assert resp.status == 422 and "buckets" in (await resp.json())["fields"]
    resp = await client.post(
        "/api/v1/admin/flash-sales", headers=admin, json={**body, "buckets": 4}
    )
    assert resp.status == 201
    sale_id = (await resp.json())["data"]["flash_sale_id"]
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}", headers=admin, json={"mode": "queued"}
    )
    assert resp.status == 422 and "mode" in (await resp.json())["fields"]
    assert await db.fetchval("SELECT on_hand FROM skus WHERE id = $1", sku) == 10_000 - 5


async def test_the_per_address_limit_holds_across_buckets(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    """An address's shoppers spread over every bucket; together they get the address's
    burst once per sale, not once per bucket (each bucket grants its share)."""
    n, burst = 8, 16
    # no refill during the test: what passes is the burst, exactly
    settings = base_settings.with_(rate_ip_per_s=0.001, rate_ip_burst=burst)
    async with TestClient(GatewayServer(create_app(settings))) as c:
        admin = await admin_headers(db, tokens)
        sale_id = await create_sale(c, admin, await make_sku(db), quantity=200, buckets=n)
        users = await make_users(db, 8 * n)  # all from this test's one loopback address
        homes = collections.Counter(buckets.home(u, n) for u in users)
        statuses: collections.Counter[tuple[int, str | None]] = collections.Counter()
        for uid in users:
            resp = await join(c, sale_id, auth(tokens, uid))
            body = await resp.json()
            statuses[(resp.status, body.get("error"))] += 1
    share = burst // n
    assert statuses[(202, None)] == sum(min(k, share) for k in homes.values()) == burst
    assert statuses[(429, "RATE_LIMITED")] == len(users) - burst, statuses
    left = sum(
        [int(await redis.hget(rediskeys.sale(sale_id, b), "remaining") or 0) for b in range(n)]
    )
    assert left == 200 - burst
