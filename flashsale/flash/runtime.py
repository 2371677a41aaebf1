"""The stores one worker serves flash sales with: scripts, the batcher, the cache, the producer."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from flashsale.flash.cache import SaleCache
from flashsale.settings import Settings
from flashsale.stores.clusterbatch import ClusterScriptBatcher
from flashsale.stores.kafka import OrderProducer
from flashsale.stores.redisbatch import ScriptBatcher
from flashsale.stores.scripts import FlashScripts


@dataclass
class FlashRuntime:
    """The stores a worker joins with, built once per worker (``open_runtime``)."""

    settings: Settings
    redis: Redis
    scripts: FlashScripts
    batcher: ScriptBatcher | ClusterScriptBatcher
    cache: SaleCache
    producer: OrderProducer


async def open_runtime(settings: Settings, redis: Redis, producer: OrderProducer) -> FlashRuntime:
    """Register and preload the scripts, fill the cache; close with ``runtime.batcher.close()``."""
    scripts = FlashScripts.register(redis)
    await scripts.preload(redis)
    cache = SaleCache(redis)
    await cache.refresh()
    return FlashRuntime(settings, redis, scripts, open_batcher(settings), cache, producer)


def open_batcher(settings: Settings) -> ScriptBatcher | ClusterScriptBatcher:
    """The join path's pipelined connection: to the one Redis, or one per cluster primary."""
    options = {
        "wait_replicas": settings.redis_wait_replicas,
        "wait_timeout_ms": settings.redis_wait_timeout_ms,
    }
    if settings.redis_cluster:
        return ClusterScriptBatcher(settings.redis_seeds, **options)
    return ScriptBatcher(settings.redis, **options)
