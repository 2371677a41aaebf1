"""A worker's copy of shared state kept in step with Redis: a subscriber applies each
message as it is published, a poller calls ``refresh`` every ``every_s`` and whenever the
subscriber (re)connects (a message lost with a dropped connection). Token revocations
(flashsale/sessions.py) and the contingency plans (flashsale/plans.py) are kept so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale.stores import tasks
from flashsale.stores.redisclient import leaks_as_connection_errors, pubsub_client

log = logging.getLogger(__name__)

_RECONNECT_S: Final = 0.5


async def _subscribe(
    redis: Redis,
    channel: str,
    on_message: Callable[[bytes], None],
    wake: asyncio.Event,
    what: str,
) -> None:
    while True:
        client, owned = pubsub_client(redis)
        try:
            with leaks_as_connection_errors():
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    wake.set()  # messages may have been missed while unsubscribed: poll now
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            on_message(message["data"])
        except (RedisError, OSError) as exc:
            if tasks.cancel_requested():
                raise asyncio.CancelledError from None
            log.warning("%s subscriber lost Redis (%s); reconnecting", what, exc)
        finally:
            if owned:
                await client.aclose()
        await asyncio.sleep(_RECONNECT_S)


async def _poll(
    refresh: Callable[[], Awaitable[None]],
    every_s: float,
    wake: asyncio.Event,
    errors: tuple[type[BaseException], ...],
    what: str,
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await wake.wait()
        if tasks.cancel_requested():  # 3.11's timeout can turn a cancel into TimeoutError
            raise asyncio.CancelledError
        wake.clear()
        try:
            with leaks_as_connection_errors():
                await refresh()
        except errors as exc:
            if tasks.cancel_requested():
                raise asyncio.CancelledError from None
            log.warning("%s not refreshed (%s)", what, exc)


@contextlib.asynccontextmanager
async def followed(
    redis: Redis,
    channel: str,
    refresh: Callable[[], Awaitable[None]],
    *,
    every_s: float,
    what: str,
    on_message: Callable[[bytes], None] | None = None,
    errors: tuple[type[BaseException], ...] = (RedisError, OSError),
) -> AsyncIterator[None]:
    """Run the subscriber and the poller while inside. Without ``on_message`` a message
    only wakes the poller (the refresh reads the state anew)."""
    wake = asyncio.Event()

    def woken(_: bytes) -> None:
        wake.set()

    loops = [
        asyncio.create_task(
            _subscribe(redis, channel, on_message or woken, wake, what), name=f"{what}-sub"
        ),
        asyncio.create_task(_poll(refresh, every_s, wake, errors, what), name=f"{what}-poll"),
    ]
    try:
        yield
    finally:
        await tasks.stop(*loops)
