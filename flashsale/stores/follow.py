"""A worker's copy of shared state kept in step with Redis: a subscriber applies each
message as it is published, a poller calls ``refresh`` every ``every_s`` and whenever the
subscriber (re)connects (a message lost with a dropped connection). Token revocations
(flashsale/sessions.py) and the contingency plans (flashsale/plans.py) are kept so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis

from flashsale.stores import tasks
from flashsale.stores.redisclient import pubsub_client
from flashsale.timing import FOLLOW_RECONNECT_S

log = logging.getLogger(__name__)


async def _subscribe(
    redis: Redis,
    channel: str,
    on_message: Callable[[bytes], None],
    wake: asyncio.Event,
) -> None:
    """One subscription, until its connection is lost."""
    client, owned = pubsub_client(redis)
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            wake.set()  # messages may have been missed while unsubscribed: poll now
            async for message in pubsub.listen():
                if message["type"] == "message":
                    on_message(message["data"])
    finally:
        if owned:
            await client.aclose()


@contextlib.asynccontextmanager
async def followed(
    redis: Redis,
    channel: str,
    refresh: Callable[[], Awaitable[None]],
    *,
    every_s: float,
    what: str,
    on_message: Callable[[bytes], None] | None = None,
    errors: tuple[type[BaseException], ...] = tasks.STORE_ERRORS,
) -> AsyncIterator[None]:
    """Run the subscriber and the poller while inside. Without ``on_message`` a message
    only wakes the poller (the refresh reads the state anew)."""
    wake = asyncio.Event()

    def woken(_: bytes) -> None:
        wake.set()

    subscriber = tasks.guarded_loop(
        functools.partial(_subscribe, redis, channel, on_message or woken, wake),
        name=f"{what} subscriber",
        every_s=FOLLOW_RECONNECT_S,
    )
    poller = tasks.guarded_loop(
        refresh, name=f"{what} refresh", every_s=every_s, errors=errors, wait_first=True, wake=wake
    )
    loops = [
        asyncio.create_task(subscriber, name=f"{what}-sub"),
        asyncio.create_task(poller, name=f"{what}-poll"),
    ]
    try:
        yield
    finally:
        await tasks.stop(*loops)
