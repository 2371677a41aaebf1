"""Many gateways: two ``flashsale serve`` processes started apart (as two hosts would run
them) share nothing but the stores. A sale sold out through one is refused by every
worker of the other from its in-process flag, without a script call."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from stack.embedded import Server, free_port, start_redis
from tests.faultkit import Proc
from tests.flashkit import (
    admin_headers,
    create_sale_over_http,
    forget_sale,
    make_sku,
    make_users,
    sse_events,
)

pytestmark = pytest.mark.integration

WORKERS = 2
PROBES = 24  # requests on fresh connections: every worker of a host answers some of them


@pytest.fixture
async def hosts(
    base_settings: Settings, tmp_path: Path
) -> AsyncIterator[tuple[Settings, list[str]]]:
    """Two gateway processes of ``WORKERS`` workers each, on a Redis of this test's own."""
    redis_server: Server = start_redis(tmp_path / "redis", persist=False)
    tag = secrets.token_hex(3)
    settings = base_settings.with_(
        redis_url=redis_server.url,
        kafka_orders_topic=f"{base_settings.kafka_orders_topic}.hosts.{tag}",
        kafka_dlq_topic=f"{base_settings.kafka_dlq_topic}.hosts.{tag}",
        workers=WORKERS,
        metrics_port=0,
        access_log=False,
    )
    procs: list[Proc] = []
    urls: list[str] = []
    for name in ("host-a", "host-b"):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
        env.update(settings.with_(http_port=port, data_dir=str(tmp_path / name)).to_env())
        procs.append(Proc(name, ["serve"], env, tmp_path / f"{name}.log").start())
        urls.append(f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as http:
            for url in urls:
                await _until_ready(http, url)
        yield settings, urls
    finally:
        for proc in procs:
            proc.stop()
        redis_server.stop()


async def _until_ready(http: aiohttp.ClientSession, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with http.get(url + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout_s}s")


async def _evalsha_calls(redis: Redis) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_sold_out_on_one_host_is_refused_by_every_worker_of_another(
    hosts: tuple[Settings, list[str]], db: asyncpg.Pool, tokens: TokenService
) -> None:
    settings, (host_a, host_b) = hosts
    quantity = 5
    sku = await make_sku(db)
    users = await make_users(db, quantity + 1 + PROBES)
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(connector=fresh) as http:
        admin = await admin_headers(db, tokens)
        sale_id = await create_sale_over_http(http, host_a, admin, sku, quantity)
        path = f"/api/v1/flash-sales/{sale_id}"

        async def statuses(url: str) -> set[str]:
            async def one() -> str:
                async with http.get(url + path) as resp:
                    assert resp.status == 200
                    return str((await resp.json())["data"]["status"])

            return set(await asyncio.gather(*(one() for _ in range(PROBES))))

        async def join(url: str, uid: int) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"}
            async with http.post(url + path + "/join", headers=headers, json={"quantity": 1}) as r:
                body = await r.json()
                return r.status, str(body.get("error", ""))

        assert await statuses(host_b) == {"active"}
        for uid in users[:quantity]:
            assert (await join(host_a, uid))[0] == 202
        assert await join(host_a, users[quantity]) == (409, "SOLD_OUT")
        sold_out_at = time.monotonic()

        deadline = sold_out_at + 10
        while await statuses(host_b) != {"sold_out"}:
            assert time.monotonic() < deadline, "host B never learned the sale sold out"
            await asyncio.sleep(0.05)
        print(f"every worker of host B saw sold out {time.monotonic() - sold_out_at:.2f}s later")

        # ... and refuses from its flag: no script runs for these joins
        redis = Redis.from_url(settings.redis)
        try:
            before = await _evalsha_calls(redis)
            answers = await asyncio.gather(*(join(host_b, u) for u in users[quantity + 1 :]))
            calls = await _evalsha_calls(redis) - before
        finally:
            await redis.aclose()
    await forget_sale(db, None, sale_id)  # its Redis goes with the fixture
    assert set(answers) == {(409, "SOLD_OUT")}
    # at most the machine-id lease renewals of the four workers fall in this window
    assert calls <= 2 * WORKERS < len(answers)


async def _snapshots_until(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float = 40.0,
) -> dict[str, Any]:
    """Read a dashboard event stream until a snapshot satisfies ``done``; return it."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        buf = b""
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(resp.content.readany(), 20)
            assert chunk, "stream ended"
            events, buf = sse_events(buf + chunk)
            for name, data in events:
                if name == "snapshot":
                    last = data
                    if done(last):
                        return last
    raise AssertionError(f"no snapshot showed every host's figures; the last: {last}")


async def test_dashboard_of_one_host_shows_every_host_and_the_consumer(
    hosts: tuple[Settings, list[str]], db: asyncpg.Pool, tokens: TokenService, tmp_path: Path
) -> None:
    """Joins and refusals made on host B, and the orders a consumer running apart
    persisted, appear in the dashboard read from host A: every process publishes its
    figures to Redis, and the dashboard sums them, not host A's metrics folder."""
    settings, (host_a, host_b) = hosts
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        settings.with_(
            data_dir=str(tmp_path / "consumer-host"),
            kafka_consumer_group=f"dash-hosts-{secrets.token_hex(3)}",
        ).to_env()
    )
    consumer = Proc("consumer", ["consume"], env, tmp_path / "consumer.log").start()
    quantity = 3
    try:
        admin = await admin_headers(db, tokens)
        users = await make_users(db, quantity + 2)
        async with aiohttp.ClientSession() as http:
            sale_id = await create_sale_over_http(http, host_a, admin, await make_sku(db), quantity)
            path = f"/api/v1/flash-sales/{sale_id}/join"

            async def join(uid: int) -> tuple[int, str]:
                headers = {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"}
                async with http.post(host_b + path, headers=headers, json={"quantity": 1}) as r:
                    return r.status, str((await r.json()).get("error", ""))

            assert [await join(u) for u in users[: quantity - 1]] == [(202, "")] * (quantity - 1)
            assert await join(users[0]) == (409, "LIMIT_EXCEEDED")
            assert await join(users[quantity - 1]) == (202, "")
            assert await join(users[quantity]) == (409, "SOLD_OUT")
            assert await join(users[quantity + 1]) == (409, "SOLD_OUT")

            def every_host(snap: dict[str, Any]) -> bool:
                return bool(
                    snap["refusals_total"].get("SOLD_OUT", 0) >= 2
                    and snap["refusals_total"].get("LIMIT_EXCEEDED", 0) >= 1
                    and snap["consumer"]["persisted_total"] >= quantity
                    and snap["join_latency_ms"]["p50"] is not None
                    # two hosts' workers and the consumer
                    and snap["processes"] >= 2 * WORKERS + 1
                )

            snap = await _snapshots_until(
                http, f"{host_a}/api/v1/dashboard/sales/{sale_id}/events", admin, every_host
            )
    finally:
        consumer.stop()
    await forget_sale(db, None, sale_id)
    assert snap["accepted_units"] == quantity
    assert snap["sale"]["status"] == "sold_out"
    # this test's Redis is its own: exactly what host B refused, and nothing twice
    assert snap["refusals_total"] == {"SOLD_OUT": 2, "LIMIT_EXCEEDED": 1}
    assert snap["consumer"]["lag"] == 0
    assert snap["dead_letters"] == 0
