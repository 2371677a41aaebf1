"""Contingency plans (flashsale/plans.py): switched by an admin on one host, in force on
another within a second (pub/sub, the poller set to a minute so it cannot be what carried
it), applied per request by the gate, written to the operation log, flipped by the CLI.

Each test runs its own valkey: a plan left on in the suite's Redis would gate other tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode

from flashsale import plans
from flashsale.auth import TokenService
from flashsale.dashboard.hub import DashboardHub
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from gateway.app import create_app
from gateway.plans_runtime import CPU, SWITCHES
from stack.embedded import Server, free_port, start_redis
from tests.conftest import auth
from tests.faultkit import when
from tests.flashkit import (
    GatewayServer,
    admin_headers,
    count_orders,
    create_sale,
    eventually,
    make_admin,
    make_sku,
    make_users,
    remaining_of,
)

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


@pytest.fixture
async def own_redis() -> AsyncIterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="flashsale-plans-"))
    server = start_redis(root / "redis")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def admin_id(db: asyncpg.Pool) -> int:
    return await make_admin(db)


@pytest.fixture
async def admin(admin_id: int, tokens: TokenService) -> dict[str, str]:
    return auth(tokens, admin_id, role="admin")


@pytest.fixture
async def shopper(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return auth(tokens, (await make_users(db, 1))[0])


async def flip(
    client: Client, admin: dict[str, str], name: str, mode: str, **extra: Any
) -> dict[str, Any]:
    resp = await client.put(
        f"/api/v1/admin/plans/{name}",
        json={"mode": mode, "confirm": name, "reason": "test", **extra},
        headers=admin,
    )
    body = await resp.json()
    assert resp.status == 200, body
    data: dict[str, Any] = body["data"]
    return data


async def test_a_switch_flipped_on_host_a_is_in_force_on_host_b(
    base_settings: Settings,
    own_redis: Server,
    admin: dict[str, str],
    admin_id: int,
    shopper: dict[str, str],
) -> None:
    settings = base_settings.with_(redis_url=own_redis.url, plan_poll_ms=60_000)
    host_a, host_b = create_app(settings), create_app(settings)
    async with TestClient(GatewayServer(host_a)) as a, TestClient(GatewayServer(host_b)) as b:
        resp = await a.put(
            "/api/v1/admin/plans/read-only",
            json={"mode": "on", "confirm": "read-on"},
            headers=admin,
        )
        assert resp.status == 422  # the name must be typed back
        assert not host_b[SWITCHES].read_only

        flipped = time.monotonic()
        state = await flip(a, admin, plans.READ_ONLY, "on")
        assert state["on"] and state["moved"] and state["by"] == f"admin:{admin_id}"
        await when(lambda: host_b[SWITCHES].read_only, timeout_s=5)
        print(f"read-only in force on host B after {time.monotonic() - flipped:.3f}s")

        # host B: a join is refused with its own code, a cart write too; reads go on
        join = await b.post("/api/v1/flash-sales/1/join", json={"quantity": 1}, headers=shopper)
        assert join.status == 503 and (await join.json())["error"] == "READ_ONLY"
        assert "Retry-After" in join.headers
        cart = await b.post("/api/v1/cart/items", json={"sku_id": 1, "quantity": 1})
        assert cart.status == 503 and (await cart.json())["error"] == "READ_ONLY"
        assert (await b.get("/api/v1/flash-sales/active")).status == 200
        closing = await b.post("/api/v1/admin/flash-sales/1/close", headers=admin)
        assert closing.status == 503 and (await closing.json())["error"] == "READ_ONLY"
        # an admin can still close the plan from the host that is read-only
        assert (await flip(b, admin, plans.READ_ONLY, "off"))["on"] is False
        await when(lambda: not host_a[SWITCHES].read_only, timeout_s=5)
        again = await a.post("/api/v1/cart/items", json={"sku_id": 10**12, "quantity": 1})
        assert again.status == 404  # the write reaches the shop again (no such SKU)

        listed = await a.get("/api/v1/admin/plans", headers=admin)
        data = (await listed.json())["data"]
        assert {p["name"] for p in data["plans"]} == set(plans.PLANS)
        moves = [(e["plan"], e["from"], e["to"], e["by"]) for e in data["log"]]
        assert moves[:2] == [
            ("read-only", "on", "off", f"admin:{admin_id}"),
            ("read-only", "off", "on", f"admin:{admin_id}"),
        ]
        # a second "on" of a plan already on changes and logs nothing
        await flip(a, admin, plans.PAUSE_BACKGROUND, "on")
        assert (await flip(a, admin, plans.PAUSE_BACKGROUND, "on"))["moved"] is False
        redis = Redis.from_url(own_redis.url)
        try:
            assert await redis.xlen(rediskeys.PLANS_LOG) == 3
        finally:
            await redis.aclose()
        forbidden = await a.get("/api/v1/admin/plans", headers=shopper)
        assert forbidden.status == 403


async def test_shed_storefront_sheds_storefront_writes_not_the_flash_path(
    base_settings: Settings, own_redis: Server, admin: dict[str, str], shopper: dict[str, str]
) -> None:
    settings = base_settings.with_(redis_url=own_redis.url)
    app = create_app(settings)
    async with TestClient(GatewayServer(app)) as client:
        await flip(client, admin, plans.SHED_STOREFRONT, "on")
        await when(lambda: app[SWITCHES].shed_storefront, timeout_s=5)
        shed = await client.post("/api/v1/cart/items", json={"sku_id": 1, "quantity": 1})
        assert shed.status == 503 and (await shed.json())["error"] == "RETRY_LATER"
        assert shed.headers["Retry-After"] == "2"
        assert (await client.get("/api/v1/categories")).status == 200  # reads kept
        # the join is never shed: it reaches the flash path (no such sale)
        join = await client.post(
            "/api/v1/flash-sales/99999999/join", json={"quantity": 1}, headers=shopper
        )
        assert join.status == 404, await join.text()
        await flip(client, admin, plans.SHED_STOREFRONT, "on", options={"reads": True})
        await when(lambda: app[SWITCHES].shed_reads, timeout_s=5)
        assert (await client.get("/api/v1/categories")).status == 503
        await flip(client, admin, plans.SHED_STOREFRONT, "off")
        await when(lambda: not app[SWITCHES].shed_storefront, timeout_s=5)
        assert (await client.get("/api/v1/categories")).status == 200


async def test_shed_storefront_waits_for_its_cpu_threshold(
    base_settings: Settings, own_redis: Server, admin: dict[str, str]
) -> None:
    """With FLASHSALE_SHED_CPU_PERCENT=100 a worker sheds only when its one thread is busy all
    the time: a test process never is, so with the plan on the storefront is still served."""
    app = create_app(base_settings.with_(redis_url=own_redis.url, shed_cpu_percent=100.0))
    async with TestClient(GatewayServer(app)) as client:
        await flip(client, admin, plans.SHED_STOREFRONT, "on")
        await when(lambda: app[SWITCHES].shed_storefront, timeout_s=5)
        served = await client.post("/api/v1/cart/items", json={"sku_id": 10**12, "quantity": 1})
        assert served.status == 404  # reached the shop: no such SKU
        statuses = []
        for _ in range(3):  # the sampler may write its own figure between the two lines
            app[CPU][0] = 100.0  # as the sampler records a saturated second
            shed = await client.post("/api/v1/cart/items", json={"sku_id": 10**12, "quantity": 1})
            statuses.append(shed.status)
            if shed.status == 503:
                assert shed.headers["Retry-After"] == "2"
                break
        assert statuses[-1] == 503, statuses


async def test_cli_flips_a_plan_and_status_shows_it(
    base_settings: Settings, own_redis: Server
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(base_settings.with_(redis_url=own_redis.url).to_env())

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stack", "plan", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = await asyncio.to_thread(cli, "on", "pause-background", stdin="yes\n")
    assert refused.returncode == 1 and "not switched" in refused.stdout
    done = await asyncio.to_thread(
        cli, "on", "pause-background", "--reason", "peak", stdin="pause-background\n"
    )
    assert done.returncode == 0, done.stderr
    armed = await asyncio.to_thread(cli, "arm", "catalog-from-cache", "--yes")
    assert armed.returncode == 0, armed.stderr
    bad = await asyncio.to_thread(cli, "arm", "read-only", "--yes")
    assert bad.returncode == 1 and "VALIDATION_FAILED" in bad.stderr
    switches = plans.Switches()
    redis = Redis.from_url(own_redis.url)
    try:
        await switches.refresh(redis)
        log = await plans.operation_log(redis)
    finally:
        await redis.aclose()
    assert switches.pause_background
    assert switches.states[plans.CATALOG_FROM_CACHE].mode == plans.ARMED
    assert [(e["plan"], e["to"], e["reason"]) for e in log] == [
        ("catalog-from-cache", "armed", ""),
        ("pause-background", "on", "peak"),
    ]
    assert log[1]["by"].startswith("cli:")


async def test_a_worker_starts_and_follows_plans_with_a_cluster_that_reaches_no_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cluster client that reaches none of its nodes raises RedisClusterException, no
    RedisError: a worker starting then must start (every plan reads off, as with Redis
    down) and its poller keep trying, not end the start-up."""
    nowhere = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", free_port())], socket_connect_timeout=1
    )
    switches = plans.Switches()
    caplog.set_level("WARNING")
    try:
        async with plans.kept_in_force(switches, cast(Redis, nowhere), every_s=0.05):

            async def failed_twice() -> bool:
                failed = [r for r in caplog.records if "plan states refresh failed" in r.message]
                return len(failed) >= 2

            await eventually(failed_twice, timeout_s=30, every_s=0.05)
    finally:
        await nowhere.aclose()
    assert any("not loaded at start" in r.message for r in caplog.records)
    assert not switches.read_only and switches.synced_at == 0.0


async def test_pause_background_stops_the_dashboard_snapshots_until_closed(
    db: asyncpg.Pool, redis: Redis, client: Client, tokens: TokenService
) -> None:
    """The hub of a worker whose plan is on computes no snapshot (nor history) for the
    ticks it sits through; closing the plan resumes it."""
    sale_id = await create_sale(client, await admin_headers(db, tokens), await make_sku(db))
    paused = [True]
    hub = DashboardHub(db, redis, paused=lambda: paused[0])
    watching = asyncio.create_task(anext(hub.watch(sale_id, idle_s=60)))
    try:
        await asyncio.sleep(2.5)  # two ticks at least go by with the plan on
        assert hub.computed == 0
        assert await redis.llen(rediskeys.dash_history(sale_id)) == 0
        paused[0] = False
        await when(lambda: hub.computed > 0, timeout_s=10)
        await when(lambda: watching.done(), timeout_s=10)
    finally:
        watching.cancel()
        await hub.close()


async def test_queue_sale_moves_a_running_sale_into_the_waiting_room_keeping_its_reservations(
    app: web.Application,
    client: Client,
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
    consumer: None,
) -> None:
    """An open sale of 30 units: 20 shoppers join directly, then queue-sale moves it into
    the waiting room mid-sale; 40 more enter the queue and join when admitted. Exactly the
    30 units are sold, to 30 different shoppers, the first 20 among them; a direct join after
    the switch needs an admission."""
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=30)
    first, later = (await make_users(db, 20)), (await make_users(db, 40))
    join = {"quantity": 1}

    async def direct(uid: int) -> int:
        resp = await client.post(
            f"/api/v1/flash-sales/{sale_id}/join", headers=auth(tokens, uid), json=join
        )
        return resp.status

    assert await asyncio.gather(*(direct(u) for u in first)) == [202] * 20
    switched = await client.put(
        "/api/v1/admin/plans/queue-sale",
        json={"mode": "on", "confirm": "queue-sale", "options": {"sale_id": sale_id}},
        headers=admin,
    )
    assert switched.status == 200, await switched.text()
    try:
        assert await direct(later[0]) == 403  # NOT_ADMITTED: the sale is queued now
        assert await remaining_of(redis, sale_id) == 10  # no reservation lost in the move

        accepted: list[int] = []
        admitted_once: dict[int, int] = {}

        async def queued_shopper(uid: int) -> None:
            headers = auth(tokens, uid)
            entered = await client.post(f"/api/v1/flash-sales/{sale_id}/enter", headers=headers)
            assert entered.status == 201, await entered.text()
            ticket = (await entered.json())["data"]["ticket"]
            for _ in range(300):
                view = (
                    await (
                        await client.get(
                            f"/api/v1/flash-sales/{sale_id}/queue",
                            params={"ticket": ticket},
                            headers=headers,
                        )
                    ).json()
                )["data"]
                if view["state"] in ("sold_out", "ended", "expired"):
                    return
                if view["state"] == "admitted":
                    admitted_once[uid] = admitted_once.get(uid, 0) + 1
                    resp = await client.post(view["join_path"], headers=headers, json=join)
                    if resp.status == 202:
                        accepted.append(uid)
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"shopper {uid} never got a final word: {view}")

        await asyncio.gather(*(queued_shopper(u) for u in later))
        assert len(accepted) == 10 and len(set(accepted)) == 10
        assert all(n == 1 for n in admitted_once.values())
        await eventually(lambda: _count_is(db, sale_id, 30), timeout_s=30)
        buyers = {
            r["user_id"]
            for r in await db.fetch("SELECT user_id FROM orders WHERE flash_sale_id = $1", sale_id)
        }
        assert buyers == set(first) | set(accepted)
        listed = await client.get("/api/v1/admin/plans", headers=admin)
        log = (await listed.json())["data"]["log"]
        assert (log[0]["plan"], log[0]["to"], log[0]["reason"]) == (
            "queue-sale",
            "on",
            f"sale {sale_id}",
        )
    finally:
        back = await client.put(
            "/api/v1/admin/plans/queue-sale",
            json={"mode": "off", "confirm": "queue-sale", "options": {"sale_id": sale_id}},
            headers=admin,
        )
        assert back.status == 200, await back.text()


async def _count_is(db: asyncpg.Pool, sale_id: int, n: int) -> bool:
    return await count_orders(db, sale_id) == n
