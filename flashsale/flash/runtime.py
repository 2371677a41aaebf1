"""The stores one worker serves flash sales with: scripts, the batcher, the cache, the producer."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from flashsale.flash.cache import SaleCache
from flashsale.kafka import OrderProducer
from flashsale.redisbatch import ScriptBatcher
from flashsale.scripts import FlashScripts
from flashsale.settings import Settings


@dataclass
class FlashRuntime:
    """The stores a worker joins with, built once per worker (``open_runtime``)."""

    settings: Settings
    redis: Redis
    scripts: FlashScripts
    batcher: ScriptBatcher
    cache: SaleCache
    producer: OrderProducer


async def open_runtime(settings: Settings, redis: Redis, producer: OrderProducer) -> FlashRuntime:
    """Register and preload the scripts, fill the cache; close with ``runtime.batcher.close()``."""
    scripts = FlashScripts.register(redis)
    await scripts.preload(redis)
    cache = SaleCache(redis)
    await cache.refresh()
    return FlashRuntime(settings, redis, scripts, ScriptBatcher(settings.redis), cache, producer)
