"""Background sweepers of the storefront: unpaid regular orders past their deadline and
stock reservations past ``reserved_until``.

Both sweeps are safe to run on every gateway process at once (``FOR UPDATE SKIP
LOCKED`` plus status-guarded updates), so there is no leader to elect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from gateway import appkeys
from gateway.services import inventory, orders

log = logging.getLogger(__name__)


async def sweep_once(app: web.Application) -> tuple[int, int]:
    """Close expired orders first (their reservations go with them), then stray holds."""
    closed = await orders.close_expired_orders(app)
    released = await inventory.release_expired(app[appkeys.DB])
    if closed or released:
        log.info("store sweep: closed %d unpaid orders, released %d reservations", closed, released)
    return closed, released


async def _run(app: web.Application, stop: asyncio.Event) -> None:
    interval_s = app[appkeys.SETTINGS].sweep_interval_ms / 1000
    while not stop.is_set():
        try:
            await sweep_once(app)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            log.exception("store sweep failed; retrying next interval")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def store_sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the sweeper loop lives exactly as long as the app."""
    stop = asyncio.Event()
    task = asyncio.create_task(_run(app, stop), name="store-sweeper")
    yield
    stop.set()
    await task
