"""``flashsale consume``: the order consumer and the sweepers in one process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis

from consumers.order_events import (
    DEAD_LETTER_LABELS,
    BatchOutcome,
    OrderBatchProcessor,
    consume_forever,
)
from consumers.store_sweeper import run_store_sweeper
from consumers.sweepers import SWEEPER_ACTIONS, run_sweepers
from flashsale.auth import require_metrics_token
from flashsale.dashboard.publish import publish_every_second
from flashsale.errors import Unauthorized, envelope, ok_envelope
from flashsale.settings import Settings
from flashsale.stores.db import create_pool
from flashsale.stores.kafka import OrderProducer
from flashsale.stores.metrics import Metrics, get_metrics
from flashsale.stores.redisclient import open_redis
from flashsale.stores.tasks import guarded_loop
from flashsale.timing import CONSUMER_HEARTBEAT_S

log = logging.getLogger(__name__)


async def run_consumers(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    except (RuntimeError, ValueError):  # not the main thread (tests)
        pass
    metrics = get_metrics()
    declare_metrics(metrics)
    heartbeat = Path(settings.data_dir) / "consumer.heartbeat"
    heartbeat.parent.mkdir(parents=True, exist_ok=True)

    def beat(_: BatchOutcome | None = None) -> None:
        heartbeat.touch()

    metrics_runner = await _serve_metrics(settings, metrics) if settings.metrics_port else None
    db = await create_pool(settings.database, min_size=2, max_size=8)
    redis: Redis = open_redis(settings)
    producer = OrderProducer(settings)
    await producer.start()
    try:
        processor = OrderBatchProcessor(settings, db, redis, producer, metrics)
        log.info("consumer %d started (group %s)", os.getpid(), settings.kafka_consumer_group)

        async def beat_now() -> None:
            beat()

        # errors=(): a heartbeat file that cannot be written is no store out of reach to
        # wait out; it ends the consumer
        heartbeat_loop = guarded_loop(
            beat_now, name="heartbeat", every_s=CONSUMER_HEARTBEAT_S, errors=(), stop=stop
        )

        tasks = [
            asyncio.create_task(consume_forever(settings, processor, stop), name="consumer"),
            asyncio.create_task(heartbeat_loop, name="heartbeat"),
            asyncio.create_task(
                publish_every_second(redis, metrics.registry, stop=stop), name="dashboard-feed"
            ),
        ]
        if settings.consumer_sweepers:
            tasks += [
                asyncio.create_task(
                    run_sweepers(settings, db, redis, producer, metrics, stop), name="sweepers"
                ),
                asyncio.create_task(
                    run_store_sweeper(db, settings.sweep_interval_ms / 1000, stop),
                    name="store-sweeper",
                ),
            ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
    finally:
        started = time.monotonic()
        await producer.stop()
        await redis.aclose()
        await db.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        log.info("consumer %d stopped in %.1fs", os.getpid(), time.monotonic() - started)


async def _serve_metrics(settings: Settings, metrics: Metrics) -> web.AppRunner:
    """``/metrics`` (lag, dead letters, sweeper actions) and ``/healthz`` of this consumer."""

    async def render(request: web.Request) -> web.Response:
        try:
            require_metrics_token(request.headers.get("Authorization", ""), settings.metrics_token)
        except Unauthorized as refused:
            return web.json_response(
                envelope(refused.http_status, refused.code, refused.message),
                status=refused.http_status,
                headers=refused.headers,
            )
        body, content_type = metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(ok_envelope({"status": "alive"}))

    app = web.Application()
    app.router.add_get("/metrics", render)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.metrics_port).start()
    log.info("consumer metrics on %s:%d/metrics", settings.http_host, settings.metrics_port)
    return runner


def declare_metrics(metrics: Metrics) -> None:
    """The consumers' series the dashboards plot exist at zero from the start."""
    metrics.declare(sweeper_actions=SWEEPER_ACTIONS, dead_letter_reasons=DEAD_LETTER_LABELS)
