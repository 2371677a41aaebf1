"""The application factory: one ``create_app(settings)``, one cleanup context per resource."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web
from redis.asyncio import Redis

from flashsale import sessions
from flashsale.auth import PasswordHashing, TokenService
from flashsale.flash.runtime import open_batcher
from flashsale.plans import Switches
from flashsale.settings import Settings
from flashsale.stores import tasks
from flashsale.stores.db import create_pool
from flashsale.stores.ids import MachineLease, OrderIdGenerator, OrderIds
from flashsale.stores.kafka import OrderProducer
from flashsale.stores.metrics import Metrics, RequestStats, get_metrics
from flashsale.stores.redisclient import open_redis
from flashsale.timing import CONNECT_TIMEOUT_S, EXPORT_EVERY_S
from gateway import appkeys
from gateway.middlewares import make_middleware
from gateway.routes import health, users
from gateway.routing import Route, add_routes
from gateway.streams import StreamSlots

log = logging.getLogger(__name__)

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[appkeys.SETTINGS]
    pool = await create_pool(s.database, min_size=s.db_pool_min, max_size=s.db_pool_max)
    app[appkeys.DB] = pool
    yield
    await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[appkeys.SETTINGS]
    client: Redis = open_redis(
        s,
        decode_responses=False,
        max_connections=256,
        health_check_interval=30,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    await client.ping()
    app[appkeys.REDIS] = client
    yield
    await client.aclose()


async def kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    producer = OrderProducer(app[appkeys.SETTINGS])
    await producer.start()
    app[appkeys.PRODUCER] = producer
    yield
    await producer.stop()


async def ids_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[appkeys.SETTINGS]
    if s.machine_id is not None:
        app[appkeys.ORDER_IDS] = OrderIds(None, OrderIdGenerator(s.machine_id))
        yield
        return
    # with replicas awaited, the lease goes through a pipelined connection that ends each
    # batch with WAIT, so a failover never hands a second process the same machine id
    lease = MachineLease(app[appkeys.REDIS], open_batcher(s) if s.redis_wait_replicas else None)
    await lease.acquire()
    app[appkeys.ORDER_IDS] = OrderIds(lease)
    yield
    await lease.release()


async def revocations_ctx(app: web.Application) -> AsyncIterator[None]:
    revocations = app[appkeys.TOKENS].revocations
    assert isinstance(revocations, sessions.Revocations)  # the one create_app gave the tokens
    every_s = app[appkeys.SETTINGS].revocation_reload_ms / 1000
    async with sessions.kept_fresh(
        revocations, app[appkeys.REDIS], app[appkeys.DB], every_s=every_s
    ):
        yield


async def stats_ctx(app: web.Application) -> AsyncIterator[None]:
    stats = app[appkeys.REQUEST_STATS]

    async def flush() -> None:
        stats.flush()

    # errors=(): no I/O, so no store error to live through; a failure is a bug
    flusher = tasks.guarded_loop(
        flush, name="request stats", every_s=EXPORT_EVERY_S, errors=(), wait_first=True
    )
    task = asyncio.create_task(flusher, name="request-stats")
    yield
    await tasks.stop(task)
    stats.flush()


async def dashboard_feed_ctx(app: web.Application) -> AsyncIterator[None]:
    """Once a second: this worker's request figures to Prometheus (the flush) and what
    changed to Redis, where the dashboard sums every worker of every host."""
    from flashsale.dashboard.publish import publish_every_second
    from gateway.routes.flashsales import JOIN_PATHS

    stop = asyncio.Event()
    task = asyncio.create_task(
        publish_every_second(
            app[appkeys.REDIS],
            app[appkeys.METRICS].registry,
            before=app[appkeys.REQUEST_STATS].flush,
            stop=stop,
            join_routes=JOIN_PATHS,
        ),
        name="dashboard-feed",
    )
    yield
    stop.set()
    await task


def all_routes(settings: Settings | None = None) -> list[Route]:
    """Every route of the service (the OpenAPI spec is built from the same table)."""
    from gateway.routes import extra_routes

    return [*health.ROUTES, *users.ROUTES, *extra_routes(settings)]


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    extra_contexts: Sequence[CleanupCtx] = (),
) -> web.Application:
    """Build the gateway application; nothing connects until it starts."""
    settings.require("redis_url", "database_url", "kafka_bootstrap", "secret_key")
    m = metrics or get_metrics()
    stats = RequestStats(m)
    app = web.Application(
        middlewares=[make_middleware(stats)], client_max_size=settings.max_body_bytes
    )
    app[appkeys.REQUEST_STATS] = stats
    app[appkeys.SETTINGS] = settings
    app[appkeys.METRICS] = m
    revocations = sessions.Revocations(max_stale_s=settings.revocation_max_stale_s)
    app[appkeys.TOKENS] = TokenService(
        settings.secret,
        settings.token_ttl_s,
        revocations=revocations,
        cache_size=settings.token_cache_size,
    )
    from gateway.plans_runtime import CPU, SWITCHES, make_plan_gate

    app[SWITCHES] = Switches()
    app[CPU] = [0.0]
    app.middlewares.append(make_plan_gate(app[SWITCHES], app))
    app[appkeys.STREAMS] = StreamSlots.from_settings(settings)
    app[appkeys.PASSWORD_HASHER] = PasswordHashing(
        settings.login_hash_concurrency,
        settings.login_hash_queue,
        signup_concurrency=settings.register_hash_concurrency,
        signup_queue=settings.register_hash_queue,
    )
    app.cleanup_ctx.extend([stats_ctx, db_ctx, redis_ctx, dashboard_feed_ctx, revocations_ctx])
    app.cleanup_ctx.extend([ids_ctx, kafka_ctx, *extra_contexts])
    from gateway.routes import extra_contexts as area_contexts

    app.cleanup_ctx.extend(area_contexts())
    from gateway.routes.dashboard import end_streams

    app.on_shutdown.append(end_streams)  # before aiohttp waits for the open requests
    add_routes(app, all_routes(settings))
    _declare_metrics(app, m)
    return app


def _declare_metrics(app: web.Application, metrics: Metrics) -> None:
    """The series the dashboards plot exist at zero from the start: every error code, and
    the joins' requests (accepted, 202) and latency."""
    from flashsale.errors import error_codes

    joins = [
        (route.method, route.resource.canonical, "202")
        for route in app.router.routes()
        if route.resource is not None and "/flash-sales/{sale_id}/join" in route.resource.canonical
    ]
    metrics.declare(error_codes=error_codes(), routes=joins)
