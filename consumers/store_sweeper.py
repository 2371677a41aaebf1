"""Background sweepers of the storefront: unpaid regular orders past their deadline,
stock reservations past ``reserved_until`` and unpaid presale orders past ``expires_at``.

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

from flashsale import inventory, orders, presale
from gateway import appkeys

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0


async def sweep_once(app: web.Application) -> tuple[int, int, int]:
    """Close expired orders first (their reservations go with them), then stray holds,
    then unpaid presale orders past their hold."""
    closed = await orders.close_expired_orders(app)
    released = await inventory.release_expired(app[appkeys.DB])
    presales = await presale.cancel_expired(app[appkeys.DB])
    if closed or released or presales:
        log.info(
            "store sweep: closed %d unpaid orders, released %d reservations, "
            "cancelled %d unpaid presale orders",
            closed,
            released,
            presales,
        )
    return closed, released, presales


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
    try:
        # a sweep waiting on a row lock must not hold up the shutdown; what it did not
        # finish rolls back, and the next sweep (here or in a sibling) does it
        await asyncio.wait_for(task, STOP_GRACE_S)
    except TimeoutError:
        log.warning("store sweep still running after %.0fs; cancelled", STOP_GRACE_S)
