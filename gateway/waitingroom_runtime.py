"""The waiting room on the app: one per worker, its copy refreshed and its admitter run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from flashsale.stores import tasks
from flashsale.waitingroom.room import WaitingRoom, run_forever
from gateway import appkeys
from gateway.flash_runtime import FLASH

WAITING_ROOM: Final = web.AppKey("waiting_room", WaitingRoom)


async def waiting_room_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[FLASH]
    room = WaitingRoom(app[appkeys.SETTINGS], rt.redis, rt.cache, app[appkeys.METRICS])
    await room.refresh()
    app[WAITING_ROOM] = room
    stop = asyncio.Event()
    task = asyncio.create_task(run_forever(room, stop), name="waiting-room")
    yield
    stop.set()  # the loop ends after its step; the cancel ends a step stuck on the store
    await tasks.stop(task)
