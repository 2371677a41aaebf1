"""The flash-sale runtime on the app: built once per worker, its cache kept fresh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from flashsale.flash.runtime import FlashRuntime, open_runtime
from flashsale.stores import tasks
from flashsale.timing import SALE_CACHE_REFRESH_S
from gateway import appkeys

FLASH: Final = web.AppKey("flash", FlashRuntime)


async def flash_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = await open_runtime(app[appkeys.SETTINGS], app[appkeys.REDIS], app[appkeys.PRODUCER])
    app[FLASH] = runtime
    cache = runtime.cache
    batcher, metrics = runtime.batcher, app[appkeys.METRICS]
    pipelines = metrics.redis_calls.labels("reserve_pipeline")
    calls = metrics.redis_calls.labels("reserve_call")
    seen = [0, 0]  # round trips and calls already counted

    async def refresh() -> None:
        pipelines.inc(batcher.round_trips - seen[0])
        calls.inc(batcher.calls - seen[1])
        seen[:] = batcher.round_trips, batcher.calls
        await cache.refresh()

    refresher = tasks.guarded_loop(
        refresh, name="sale cache refresh", every_s=SALE_CACHE_REFRESH_S, wait_first=True
    )
    task = asyncio.create_task(refresher, name="sale-cache-refresh")
    yield
    await tasks.stop(task)
    await runtime.batcher.close()
