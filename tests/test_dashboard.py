"""The dashboard's figures, its event stream and who may watch, on the real stores."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from consumers import reconcile, reconcile_money
from flashsale.auth import TokenService
from flashsale.dashboard import aggregate, hub, publish, snapshot, totals
from flashsale.stores import rediskeys
from flashsale.timing import DASH_RATE_WINDOW_S
from gateway import appkeys
from gateway.routes.flashsales import ADMITTED_JOIN_PATH, JOIN_PATH, JOIN_PATHS
from stack.embedded import free_port
from tests.conftest import auth, make_user
from tests.flashkit import admin_headers, create_sale, join, make_sku, make_users, sse_events

pytestmark = pytest.mark.integration


async def _merchant_of_sku(db: asyncpg.Pool, sku_id: int) -> int:
    merchant: int = await db.fetchval(
        "SELECT p.merchant_id FROM skus s JOIN products p ON p.id = s.product_id WHERE s.id = $1",
        sku_id,
    )
    return merchant


async def _read_events(
    client: TestClient[Any, Any], path: str, headers: dict[str, str], want: int
) -> list[tuple[str, Any]]:
    """The first ``want`` events of a stream, then hang up."""
    out: list[tuple[str, Any]] = []
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        buf = b""
        while len(out) < want:
            chunk = await asyncio.wait_for(resp.content.readany(), 20)
            assert chunk, "stream ended"
            events, buf = sse_events(buf + chunk)
            out.extend(events)
    return out


def test_quantile_interpolates_within_the_bucket() -> None:
    before = {0.001: 0.0, 0.01: 0.0, 0.1: 0.0, float("inf"): 0.0}
    after = {0.001: 0.0, 0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    assert aggregate.quantile(0.5, before, after) == pytest.approx(0.01)
    assert aggregate.quantile(0.99, before, after) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert aggregate.quantile(0.5, after, after) is None  # nothing observed in between


@pytest.mark.both_topologies
async def test_stream_shows_what_the_sale_did(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService, redis: Redis
) -> None:
    admin = await admin_headers(db, tokens)
    sku = await make_sku(db)
    sale_id = await create_sale(client, admin, sku, quantity=3, limit=1)
    shoppers = await make_users(db, 5)
    statuses = [(await join(client, sale_id, auth(tokens, uid))).status for uid in shoppers]
    assert statuses.count(202) == 3
    again = await join(client, sale_id, auth(tokens, shoppers[0]))
    assert again.status == 409
    client.app[appkeys.REQUEST_STATS].flush()
    await publish.publisher_for(client.app[appkeys.METRICS].registry).publish(redis)
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    drift = abs((await reconcile.check_sale(db, redis, sale)).drift)  # a command of its own
    await reconcile_money.check_money(db, redis, [sale_id])  # the same command, money side

    events = await _read_events(client, f"/api/v1/dashboard/sales/{sale_id}/events", admin, want=3)
    assert events[0][0] == "history"
    snaps = [data for name, data in events if name == "snapshot"]
    assert len(snaps) == 2 and snaps[0]["t"] < snaps[1]["t"]
    last = snaps[-1]
    assert last["sale"]["remaining_quantity"] == 0
    assert last["sale"]["total_quantity"] == 3
    assert last["sale"]["status"] == "sold_out"
    assert last["accepted_units"] == 3
    assert last["refusals_total"].get("SOLD_OUT", 0) >= 1
    assert sum(last["orders"].values()) >= 3  # queued in Redis or already in PostgreSQL
    assert last["waiting_room"] is None
    assert last["reconcile_drift"] == drift
    assert last["reconcile_money_drift"] == 0  # its orders are unpaid: nothing to add up yet
    assert last["processes"] >= 1
    assert "totals" in last
    # a second watcher gets the minutes already recorded
    events = await _read_events(client, f"/api/v1/dashboard/sales/{sale_id}/events", admin, want=1)
    assert len(events[0][1]) >= 2 and "totals" not in events[0][1][0]


async def test_one_process_computes_each_second(
    db: asyncpg.Pool, redis: Redis, client: TestClient[Any, Any], tokens: TokenService
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5)
    workers = [hub.DashboardHub(db, redis) for _ in range(3)]
    second = 4_000_000_000 + sale_id  # a second no loop of the app will tick
    snaps = await asyncio.gather(*(w.tick(sale_id, second) for w in workers))
    assert sum(w.computed for w in workers) == 1
    assert all(s is not None and s["second"] == second for s in snaps)
    assert len({orjson.dumps(s) for s in snaps}) == 1
    stored = await redis.get(rediskeys.dash_snapshot(sale_id))
    assert stored is not None and orjson.loads(stored)["second"] == second


async def test_merchants_see_their_own_sales(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    admin = await admin_headers(db, tokens)
    mine_sku, other_sku = await make_sku(db), await make_sku(db)
    mine = await create_sale(client, admin, mine_sku, quantity=2)
    other = await create_sale(client, admin, other_sku, quantity=2)
    merchant = auth(tokens, await _merchant_of_sku(db, mine_sku), "merchant")

    resp = await client.get("/api/v1/dashboard/sales", headers=merchant)
    ids = [s["flash_sale_id"] for s in (await resp.json())["data"]]
    assert ids == [mine]
    resp = await client.get("/api/v1/dashboard/sales", headers=admin)
    listed = {s["flash_sale_id"]: s for s in (await resp.json())["data"]}
    assert {mine, other} <= set(listed)
    assert listed[mine]["status"] == "active"
    assert listed[mine]["remaining_quantity"] == 2

    # another merchant's sale answers exactly as a missing one: no existence leak
    resp = await client.get(f"/api/v1/dashboard/sales/{other}/events", headers=merchant)
    theirs = (resp.status, (await resp.json())["error"], (await resp.json())["message"])
    resp = await client.get("/api/v1/dashboard/sales/999999999/events", headers=merchant)
    missing = (resp.status, (await resp.json())["error"], (await resp.json())["message"])
    assert theirs == missing == (404, "NOT_FOUND", "flash sale not found")
    shopper = auth(tokens, await make_user(db))
    resp = await client.get("/api/v1/dashboard/sales", headers=shopper)
    assert resp.status == 403
    resp = await client.get("/api/v1/dashboard/sales/999999999/events", headers=admin)
    assert resp.status == 404


async def test_platform_figures_are_for_admins_only(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService, redis: Redis
) -> None:
    admin = await admin_headers(db, tokens)
    sku = await make_sku(db)
    sale_id = await create_sale(client, admin, sku, quantity=1, limit=1)
    shoppers = await make_users(db, 2)
    assert [(await join(client, sale_id, auth(tokens, u))).status for u in shoppers] == [202, 409]
    client.app[appkeys.REQUEST_STATS].flush()
    await publish.publisher_for(client.app[appkeys.METRICS].registry).publish(redis)
    merchant = auth(tokens, await _merchant_of_sku(db, sku), "merchant")
    path = f"/api/v1/dashboard/sales/{sale_id}/events"

    admins = [d for n, d in await _read_events(client, path, admin, want=3) if n == "snapshot"]
    assert set(admins[-1]) >= snapshot.PLATFORM_FIGURES
    assert admins[-1]["refusals_total"].get("SOLD_OUT", 0) >= 1

    events = await _read_events(client, path, merchant, want=3)
    history, snaps = events[0][1], [d for n, d in events if n == "snapshot"]
    for seen in [*history, *snaps]:
        assert not snapshot.PLATFORM_FIGURES & set(seen), sorted(seen)
    last = snaps[-1]
    assert last["accepted_units"] == 1 and last["sale"]["remaining_quantity"] == 0
    assert last["totals"] == {"accepted_units": 1}
    assert last["orders"]["queued"] + last["orders"]["pending_payment"] >= 1


async def _stream_until_closed(
    client: TestClient[Any, Any], path: str, headers: dict[str, str], act: Any
) -> tuple[list[tuple[str, Any]], int]:
    """Open the stream, wait for its first snapshot, run ``act``, then read until the server
    ends the stream: (the events after ``act``, how many of them were snapshots)."""
    after: list[tuple[str, Any]] = []
    async with client.get(path, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        buf, acted = b"", False
        while True:
            chunk = await asyncio.wait_for(resp.content.readany(), 20)
            if not chunk:
                break  # the server ended the stream
            events, buf = sse_events(buf + chunk)
            if acted:
                after.extend(events)
            elif any(name == "snapshot" for name, _ in events):
                await act()
                acted = True
    return after, sum(1 for name, _ in after if name == "snapshot")


@pytest.mark.parametrize("how", ["logout", "demotion", "expiry"])
async def test_a_stream_ends_with_its_token(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService, how: str
) -> None:
    """A dashboard stream checks its token as every request does: a logout, a role change
    or the token's expiry ends it within a second, with a ``closed`` event naming why."""
    admin = await admin_headers(db, tokens)
    sku = await make_sku(db)
    sale_id = await create_sale(client, admin, sku, quantity=2)
    merchant_id = await _merchant_of_sku(db, sku)
    ttl = 3 if how == "expiry" else None
    watcher = {"Authorization": f"Bearer {tokens.issue(merchant_id, 'merchant', ttl_s=ttl)}"}

    async def act() -> None:
        if how == "logout":
            resp = await client.post("/api/v1/auth/logout", headers=watcher)
        elif how == "demotion":
            resp = await client.patch(
                f"/api/v1/admin/users/{merchant_id}", json={"role": "user"}, headers=admin
            )
        else:
            return  # the token runs out by itself
        assert resp.status == 200, await resp.text()

    after, snapshots = await _stream_until_closed(
        client, f"/api/v1/dashboard/sales/{sale_id}/events", watcher, act
    )
    assert after and after[-1][0] == "closed", after
    assert after[-1][1]["error"] == ("TOKEN_EXPIRED" if how == "expiry" else "TOKEN_REVOKED")
    if how != "expiry":
        # checked twice a second, snapshots come once a second: one may cross the revocation
        assert snapshots <= 1, after
    # and a new stream with that token is refused outright
    resp = await client.get(f"/api/v1/dashboard/sales/{sale_id}/events", headers=watcher)
    assert resp.status == 401


async def test_pages_and_assets_are_served(client: TestClient[Any, Any]) -> None:
    for path, kind in (
        ("/dashboard", "text/html"),
        ("/sale/1", "text/html"),
        ("/static/dashboard.js", "text/javascript"),
        ("/static/vendor/uPlot.iife.min.js", "text/javascript"),
        ("/static/vendor/uPlot.LICENSE", "text/plain"),
    ):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Type"].startswith(kind), path
    for page in ("/dashboard", "/sale/1"):
        headers = (await client.get(page)).headers
        assert headers["X-Frame-Options"] == "DENY", page
        policy = dict(d.partition(" ")[::2] for d in headers["Content-Security-Policy"].split("; "))
        assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'", policy
    assert (await client.get("/static/nope.js")).status == 404
    assert (await client.get("/static/..%2fapp.py")).status == 404
    assert (await client.get("/sale/abc")).status == 404


@pytest.mark.both_topologies
async def test_figures_of_every_process_add_up(redis: Redis) -> None:
    """Two processes publish what changed each second; the reader sums their counters,
    their latency bins and their gauges (lag summed, a queue's length the largest)."""
    second = 4_100_000_000 + secrets.randbelow(1_000_000)  # seconds of this test alone
    await redis.delete(*(rediskeys.dash_second(second + i) for i in range(-1, 3)))
    regs = [CollectorRegistry(), CollectorRegistry()]
    refused = [Counter("flashsale_errors", "e", ["code"], registry=r) for r in regs]
    admitted = [Counter("flashsale_queue_admitted", "a", registry=r) for r in regs]
    lag = [Gauge("flashsale_consumer_lag", "l", ["partition"], registry=r) for r in regs]
    length = Gauge("flashsale_queue_length", "q", ["sale_id"], registry=regs[1])
    latency = Histogram(
        "flashsale_http_request_duration_seconds",
        "h",
        ["method", "route"],
        buckets=(0.001, 0.01, 0.1),
        registry=regs[0],
    ).labels("POST", JOIN_PATH)
    pubs = [publish.Publisher(r.collect, f"proc-{i}", JOIN_PATHS) for i, r in enumerate(regs)]

    empty = await aggregate.read_aggregate(redis, second + 1)
    assert snapshot.waiting_room_figures(empty, 7) is None  # no waiting room yet
    assert empty.latency == {} and empty.processes == 0

    refused[0].labels("SOLD_OUT").inc(4)
    refused[1].labels("SOLD_OUT").inc(2)
    refused[1].labels("LIMIT_EXCEEDED").inc(1)
    admitted[0].inc(3)
    admitted[1].inc(6)
    lag[0].labels("0").set(5)
    lag[1].labels("1").set(7)
    length.labels("7").set(40)
    for _ in range(9):
        latency.observe(0.005)
    latency.observe(0.05)
    for pub in pubs:
        await pub.publish(redis, second)
    # a publish with nothing new adds nothing: only what changed since the last one counts
    refused[0].labels("SOLD_OUT").inc(1)
    for pub in pubs:
        await pub.publish(redis, second + 1)

    agg = await aggregate.read_aggregate(redis, second + 2)
    assert agg.recent.refusals == {"SOLD_OUT": 7.0, "LIMIT_EXCEEDED": 1.0}
    assert agg.recent.queue_admitted == 9.0
    assert agg.totals.lag == 12.0
    assert agg.processes == 2
    assert sum(n for le, n in agg.latency.items() if le == float("inf")) == 10
    assert aggregate.quantile(0.5, {}, agg.latency) == pytest.approx(0.001 + 0.009 * 5 / 9)
    figures = snapshot.waiting_room_figures(agg, 7)
    assert figures == {"queue_length": 40, "admitted_per_s": 9.0 / DASH_RATE_WINDOW_S}
    assert snapshot.waiting_room_figures(agg, 8) is None  # another sale's queue
    # only the complete seconds count: the second being read is still being written
    assert (await aggregate.read_aggregate(redis, second + 1)).recent.refusals == {
        "SOLD_OUT": 6.0,
        "LIMIT_EXCEEDED": 1.0,
    }


async def test_a_failed_publish_keeps_its_figures_for_the_next(redis: Redis) -> None:
    """Redis unreachable for a second: nothing is lost, the next publish carries it."""
    second = 4_150_000_000 + secrets.randbelow(1_000_000)
    registry = CollectorRegistry()
    refused = Counter("flashsale_errors", "e", ["code"], registry=registry)
    pub = publish.Publisher(registry.collect, "proc-down")
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    refused.labels("SOLD_OUT").inc(3)
    try:
        with pytest.raises(RedisError):
            await pub.publish(down, second)
    finally:
        await down.aclose()
    refused.labels("SOLD_OUT").inc(2)
    await pub.publish(redis, second + 1)
    await pub.publish(redis, second + 2)  # nothing new: adds nothing
    agg = await aggregate.read_aggregate(redis, second + 3)
    assert agg.recent.refusals == {"SOLD_OUT": 5.0}
    assert pub.published == 2


def test_joins_through_an_admission_and_its_refusals_count() -> None:
    """A queued sale's page joins through its admission's URL: those joins count with the
    others, and the waiting room's refusals are named; other routes do not count."""
    registry = CollectorRegistry()
    requests = Counter(
        "flashsale_http_requests", "requests", ["method", "route", "status"], registry=registry
    )
    errors = Counter("flashsale_errors", "errors", ["code"], registry=registry)
    requests.labels("POST", JOIN_PATH, "202").inc(2)
    requests.labels("POST", ADMITTED_JOIN_PATH, "202").inc(3)
    requests.labels("POST", ADMITTED_JOIN_PATH, "409").inc(1)
    requests.labels("POST", "/api/v1/flash-sales/{sale_id}/enter", "201").inc(7)
    errors.labels("ADMISSION_EXPIRED").inc(1)
    errors.labels("NOT_ADMITTED").inc(4)
    errors.labels("TICKET_INVALID").inc(5)  # a poll's, not a join's
    t = totals.read_metrics(registry.collect(), JOIN_PATHS)
    assert t.join_by_status == {"202": 5.0, "409": 1.0}
    assert t.refusals == {"ADMISSION_EXPIRED": 1.0, "NOT_ADMITTED": 4.0}
