"""The flash-sale runtime on the app: built once per worker, its cache kept fresh."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from redis.exceptions import RedisError

from flashsale.flash.cache import REFRESH_EVERY_S
from flashsale.flash.runtime import FlashRuntime, open_runtime
from flashsale.stores import tasks
from flashsale.stores.redisclient import leaks_as_connection_errors
from gateway import appkeys

log = logging.getLogger(__name__)

FLASH: Final = web.AppKey("flash", FlashRuntime)


async def flash_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = await open_runtime(app[appkeys.SETTINGS], app[appkeys.REDIS], app[appkeys.PRODUCER])
    app[FLASH] = runtime
    cache = runtime.cache
    # The loop also stops on this flag, not on the cancel alone: redis-py can swallow a
    # cancel that lands mid-pipeline (the task stays "cancelling" and loops on), and the
    # shutdown then waited on it for ever.
    stop = asyncio.Event()

    async def refresher() -> None:
        batcher, metrics = runtime.batcher, app[appkeys.METRICS]
        pipelines = metrics.redis_calls.labels("reserve_pipeline")
        calls = metrics.redis_calls.labels("reserve_call")
        seen_pipelines = seen_calls = 0
        while not stop.is_set():
            await asyncio.sleep(REFRESH_EVERY_S)
            pipelines.inc(batcher.round_trips - seen_pipelines)
            calls.inc(batcher.calls - seen_calls)
            seen_pipelines, seen_calls = batcher.round_trips, batcher.calls
            try:
                with leaks_as_connection_errors():
                    await cache.refresh()
            except (RedisError, OSError) as exc:
                if tasks.cancel_requested():
                    raise asyncio.CancelledError from None
                log.warning("sale cache refresh failed: %s", exc)

    task = asyncio.create_task(refresher(), name="sale-cache-refresh")
    yield
    stop.set()
    await tasks.stop(task)
    await runtime.batcher.close()
