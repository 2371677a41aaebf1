"""Shared fixtures: real servers, settings, an app client.

Tests marked ``both_topologies`` run twice: on one Redis node and on a local valkey
cluster (three primaries, one replica each, started once per session when first needed),
with ``FLASHSALE_REDIS_CLUSTER`` on and one ``WAIT`` per batch of reservations.

The suite starts its own isolated Redis, PostgreSQL and tansu broker on free ports
in a temporary folder, unless FLASHSALE_REDIS_URL, FLASHSALE_DATABASE_URL and
FLASHSALE_KAFKA_BOOTSTRAP all point at running servers (then it creates and drops a
database of its own there, uses its own topics, and may FLUSHDB the Redis it is given).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers.runner import run_consumers
from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores.db import create_pool, migrate
from flashsale.stores.redisclient import open_redis
from gateway.app import create_app
from stack.embedded import EmbeddedStack, ValkeyCluster, start_redis_cluster, start_stack
from tests.flashkit import GatewayServer

pytest_plugins = ["tests.hangwatch"]

TEST_SECRET = "test-secret-key-0123456789abcdef"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test on uvloop, the loop the service runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on one Redis node; those marked ``both_topologies`` on a cluster too."""
    if "redis_topology" not in metafunc.fixturenames:
        return
    both = metafunc.definition.get_closest_marker("both_topologies") is not None
    metafunc.parametrize(
        "redis_topology",
        ["single", "cluster"] if both else ["single"],
        indirect=True,
        scope="session",
    )


@pytest.fixture(scope="session")
def redis_topology(request: pytest.FixtureRequest) -> str:
    topology: str = getattr(request, "param", "single")
    return topology


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[ValkeyCluster]:
    """A local valkey cluster: 3 primaries + 3 replicas. Nothing here kills a node (the
    failover tests start their own), so a slow heartbeat on a busy machine must not
    promote a replica: the node timeout is generous."""
    root = Path(tempfile.mkdtemp(prefix="flashsale-cluster-"))
    cluster = start_redis_cluster(root, persist=False, node_timeout_ms=10_000)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[EmbeddedStack | None]:
    env = os.environ
    if all(
        env.get(k)
        for k in ("FLASHSALE_REDIS_URL", "FLASHSALE_DATABASE_URL", "FLASHSALE_KAFKA_BOOTSTRAP")
    ):
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="flashsale-test-"))
    started = start_stack(root, durable=False)
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(root, ignore_errors=True)


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
async def base_settings(
    stack: EmbeddedStack | None, redis_topology: str, request: pytest.FixtureRequest
) -> AsyncIterator[Settings]:
    redis_url: str | None
    admin_url: str | None
    kafka: str | None
    if stack is None:
        redis_url = os.environ["FLASHSALE_REDIS_URL"]
        admin_url = os.environ["FLASHSALE_DATABASE_URL"]
        kafka = os.environ["FLASHSALE_KAFKA_BOOTSTRAP"]
    else:
        redis_url, admin_url, kafka = (
            stack.url("redis"),
            stack.url("postgres"),
            stack.url("kafka"),
        )
    cluster = redis_topology == "cluster"
    if cluster:
        redis_url = request.getfixturevalue("valkey_cluster").url
    assert redis_url and admin_url and kafka
    dbname = "flashsale_test_" + secrets.token_hex(4)
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    suffix = secrets.token_hex(3)
    settings = Settings.from_env({}).with_(
        redis_url=redis_url,
        redis_cluster=cluster,
        redis_wait_replicas=1 if cluster else 0,
        database_url=_with_db(admin_url, dbname),
        kafka_bootstrap=kafka,
        secret_key=TEST_SECRET,
        kafka_orders_topic=f"test.orders.{suffix}",
        kafka_dlq_topic=f"test.orders.dlq.{suffix}",
        kafka_consumer_group=f"test-group-{suffix}",
        kafka_partitions=4,
        access_log=False,
        db_pool_max=20,
        stranded_after_s=2,
        sweep_interval_ms=200,
        metrics_port=0,
        payment_provider="sandbox",
        # every test registers from 127.0.0.1; tests/test_register.py checks the limit
        register_ip_attempts=1_000_000,
    )
    pool = await create_pool(settings.database, min_size=1, max_size=1)
    async with pool.acquire() as conn:
        await migrate(conn)
    await pool.close()
    yield settings
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(scope="session")
async def db(base_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(base_settings.database, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def redis(base_settings: Settings) -> AsyncIterator[Redis]:
    client: Redis = open_redis(base_settings)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tokens(base_settings: Settings) -> TokenService:
    return TokenService(base_settings.secret, base_settings.token_ttl_s)


@pytest.fixture(scope="session")
async def app(base_settings: Settings) -> AsyncIterator[web.Application]:
    application = create_app(base_settings)
    yield application


@pytest.fixture(scope="session")
async def client(app: web.Application) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(GatewayServer(app)) as c:
        yield c


@pytest.fixture(scope="session")
async def consumer(base_settings: Settings) -> AsyncIterator[None]:
    """The real consumer + sweepers, in this process, for the session's topic."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumers(base_settings, stop))
    yield
    stop.set()
    await asyncio.wait_for(task, 30)


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors() -> AsyncIterator[None]:
    """Any exception the event loop swallowed during a test fails that test."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(previous)
    assert not errors, f"unhandled loop exceptions: {errors}"


async def make_user(db: asyncpg.Pool, role: str = "user") -> int:
    """A user row without argon2 cost (tests that do not exercise login)."""
    email = f"{role}-{secrets.token_hex(6)}@test.local"
    uid: int = await db.fetchval(
        "INSERT INTO users (email, password_hash, nickname, role) VALUES ($1, 'x', 'n', $2) "
        "RETURNING id",
        email,
        role,
    )
    return uid


def auth(tokens: TokenService, user_id: int, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.issue(user_id, role)}"}
