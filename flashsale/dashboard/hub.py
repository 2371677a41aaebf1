"""The per-worker hub: one tick loop per watched sale, fanned out to local watchers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from flashsale.dashboard import history
from flashsale.dashboard.aggregate import read_aggregate
from flashsale.dashboard.snapshot import build_snapshot
from flashsale.stores import rediskeys, tasks
from flashsale.timing import (
    DASH_READ_RETRIES,
    DASH_READ_RETRY_S,
    DASH_SNAPSHOT_TTL_S,
    DASH_TICK_TTL_S,
)


def _to_next_second() -> float:
    return 1.0 - (time.time() % 1.0)


class DashboardHub:
    """Per worker: one loop per sale somebody watches, shared by all its watchers."""

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, paused: Callable[[], bool] = lambda: False
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._paused = paused  # the pause-background plan: no snapshot, no history
        self._latest: dict[int, dict[str, Any]] = {}
        self._watchers: dict[int, int] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._changed: dict[int, asyncio.Condition] = {}
        self.computed = 0  # snapshots this worker computed (the others it read)
        self._closing = False

    async def history(self, sale_id: int) -> list[dict[str, Any]]:
        return await history.read(self._redis, sale_id)

    async def watch(
        self, sale_id: int, idle_s: float = 15.0
    ) -> AsyncGenerator[dict[str, Any] | None]:
        """Every new snapshot of ``sale_id`` from now on (about one a second); None after
        ``idle_s`` without one (the sale is not in Redis, or the stores are down)."""
        cond = self._changed.setdefault(sale_id, asyncio.Condition())
        self._watchers[sale_id] = self._watchers.get(sale_id, 0) + 1
        if sale_id not in self._tasks:
            self._tasks[sale_id] = asyncio.create_task(
                self._run(sale_id), name=f"dashboard-{sale_id}"
            )
        seen = 0
        try:
            while True:
                try:
                    async with cond:
                        await asyncio.wait_for(
                            cond.wait_for(functools.partial(self._news, sale_id, seen)),
                            idle_s,
                        )
                except TimeoutError:
                    yield None
                    continue
                if self._closing:
                    return
                snap = self._latest[sale_id]
                seen = snap["t"]
                yield snap
        finally:
            self._watchers[sale_id] -= 1
            if not self._watchers[sale_id]:
                del self._watchers[sale_id]
                self._latest.pop(sale_id, None)  # a later watcher must not start from it
                task = self._tasks.pop(sale_id, None)
                if task is not None:
                    task.cancel()

    def _news(self, sale_id: int, seen: int) -> bool:
        return self._closing or self._latest.get(sale_id, {}).get("t", 0) > seen

    async def close(self) -> None:
        """Stop every loop and end every watcher's stream (the gateway is shutting down)."""
        self._closing = True
        for cond in self._changed.values():
            async with cond:
                cond.notify_all()
        loops = list(self._tasks.values())
        self._tasks.clear()
        await tasks.stop(*loops)

    async def _run(self, sale_id: int) -> None:
        async def step() -> None:
            if self._paused():
                return
            snap = await self.tick(sale_id, int(time.time()))
            if snap is None:
                return
            self._latest[sale_id] = snap
            cond = self._changed.get(sale_id)
            if cond is not None:
                async with cond:
                    cond.notify_all()

        await tasks.guarded_loop(
            step,
            name=f"dashboard snapshot of sale {sale_id}",
            every_s=_to_next_second,
            errors=tasks.STORE_OR_DATABASE_ERRORS,
            wait_first=True,
        )

    async def tick(self, sale_id: int, second: int) -> dict[str, Any] | None:
        """This second's snapshot: computed here if this worker wins the tick, else read."""
        key = rediskeys.dash_snapshot(sale_id)
        current = history.decode(await self._redis.get(key))
        if current is not None and current.get("second", 0) >= second:
            return current
        won = await self._redis.set(
            rediskeys.dash_tick(sale_id, second), os.getpid(), nx=True, ex=DASH_TICK_TTL_S
        )
        if not won:
            for _ in range(DASH_READ_RETRIES):
                await asyncio.sleep(DASH_READ_RETRY_S)
                current = history.decode(await self._redis.get(key))
                if current is not None and current.get("second", 0) >= second:
                    return current
            return current
        agg = await read_aggregate(self._redis, second)
        snap = await build_snapshot(self._pool, self._redis, sale_id, agg, current)
        if snap is None:
            return None
        snap["second"] = second
        self.computed += 1
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(key, orjson.dumps(snap), ex=DASH_SNAPSHOT_TTL_S)
        history.append(pipe, sale_id, snap)
        await pipe.execute()
        return snap


@contextlib.asynccontextmanager
async def open_hub(
    pool: asyncpg.Pool, redis: Redis, paused: Callable[[], bool] = lambda: False
) -> AsyncIterator[DashboardHub]:
    hub = DashboardHub(pool, redis, paused)
    try:
        yield hub
    finally:
        await hub.close()
