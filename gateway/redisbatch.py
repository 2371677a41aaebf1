"""Auto-pipelining: script calls made in the same event-loop tick share one round trip.

A stampede puts hundreds of joins in flight per worker. Sending each EVALSHA on its
own costs a syscall pair and a parser pass per call, which caps one process far
below what Redis can do; batching every call queued during one tick into one
pipeline keeps the one-round-trip-per-attempt promise while amortising that cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

MAX_BATCH = 512

_Call = tuple[AsyncScript, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Queue script calls and flush them as one non-transactional pipeline per tick."""

    def __init__(self, client: Redis, *, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._max_batch = max_batch
        self._pending: list[_Call] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0  # pipelines sent (each one round trip)
        self.calls = 0  # script calls carried

    def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, fut))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Call]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (script, keys, args, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, NoScriptError):  # Redis restarted or flushed its scripts
                try:
                    fut.set_result(await script(keys=list(keys), args=list(args)))
                except (RedisError, OSError) as exc:
                    fut.set_exception(exc)
            elif isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def drain(self) -> None:
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
