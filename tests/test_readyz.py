"""/readyz names the dependency that is down; uses servers of its own so it can stop them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis, RedisCluster

from flashsale.settings import Settings
from gateway.app import create_app
from gateway.routes.health import check_redis
from stack.embedded import free_port, start_stack
from tests.flashkit import GatewayServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("victim", ["redis", "postgres", "kafka"])
async def test_readyz_reports_stopped_dependency(base_settings: Settings, victim: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="flashsale-readyz-"))
    own = start_stack(
        root,
        redis=victim == "redis",
        postgres=victim == "postgres",
        kafka=victim == "kafka",
        durable=False,
    )
    try:
        url = own.url(victim)
        settings = base_settings.with_(
            **{
                "redis": {"redis_url": url},
                "postgres": {"database_url": url},
                "kafka": {"kafka_bootstrap": url},
            }[victim],
            kafka_produce_timeout_ms=1000,
            db_pool_min=0,
        )
        app = create_app(settings)
        client: TestClient[Any, Any]
        async with TestClient(GatewayServer(app)) as client:
            resp = await client.get("/readyz")
            assert resp.status == 200
            body = await resp.json()
            assert body["data"]["checks"] == {"redis": "up", "postgres": "up", "kafka": "up"}
            own.get(victim).stop()
            resp = await client.get("/readyz")
            assert resp.status == 503
            body = await resp.json()
            assert body["error"] == "NOT_READY"
            assert body["data"]["down"] == [victim]
            assert victim in body["message"]
            healthz = await client.get("/healthz")
            assert healthz.status == 200
    finally:
        own.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_a_cluster_that_reaches_no_node_is_down_not_an_error() -> None:
    """A cluster client with no node to reach raises RedisClusterException, which is not a
    RedisError: the probe counts it as "down" (readyz names it) instead of raising."""
    cluster = RedisCluster(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:  # the app's client is typed Redis whichever it is (stores.redisclient.open_redis)
        assert await check_redis(cast(Redis, cluster), timeout_s=3.0) is False
    finally:
        await cluster.aclose()
