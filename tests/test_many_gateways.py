"""Many gateways: two ``flashsale serve`` processes started apart (as two hosts would run
them) share nothing but the stores. A sale sold out through one is refused by every
worker of the other from its in-process flag, without a script call."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from gateway.embedded import Server, free_port, start_redis
from tests.faultkit import Proc
from tests.flashkit import admin_headers, forget_sale, make_sku, make_users

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
    start = datetime.now(UTC) - timedelta(seconds=1)
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(connector=fresh) as http:
        async with http.post(
            host_a + "/api/v1/admin/flash-sales",
            headers=await admin_headers(db, tokens),
            json={
                "sku_id": sku,
                "flash_price": 500,
                "quantity": quantity,
                "per_user_limit": 1,
                "start_at": start.isoformat(),
                "end_at": (start + timedelta(hours=1)).isoformat(),
                "payment_window_s": 900,
            },
        ) as resp:
            assert resp.status == 201, await resp.text()
            sale_id = (await resp.json())["data"]["flash_sale_id"]
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
