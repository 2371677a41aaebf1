"""The storefront's sweeper: unpaid regular orders past their deadline, stock reservations
past ``reserved_until`` and unpaid presale orders past ``expires_at``.

Safe to run in every consumer process at once (``FOR UPDATE SKIP LOCKED`` plus
status-guarded updates), so there is no leader to elect.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import asyncpg

from flashsale import inventory, orders, presale
from flashsale.stores import tasks
from flashsale.timing import STORE_SWEEP_STOP_GRACE_S

log = logging.getLogger(__name__)


async def sweep_once(db: asyncpg.Pool) -> tuple[int, int, int]:
    """Close expired orders first (their reservations go with them), then stray holds,
    then unpaid presale orders past their hold."""
    closed = await orders.close_expired_orders(db)
    released = await inventory.release_expired(db)
    presales = await presale.cancel_expired(db)
    if closed or released or presales:
        log.info(
            "store sweep: closed %d unpaid orders, released %d reservations, "
            "cancelled %d unpaid presale orders",
            closed,
            released,
            presales,
        )
    return closed, released, presales


async def run_store_sweeper(db: asyncpg.Pool, interval_s: float, stop: asyncio.Event) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set."""
    loop = tasks.guarded_loop(
        functools.partial(sweep_once, db),
        name="store sweep",
        every_s=interval_s,
        errors=(asyncpg.PostgresError, asyncpg.InterfaceError, OSError),
        stop=stop,
    )
    task = asyncio.create_task(loop, name="store-sweep-loop")
    await stop.wait()
    # A sweep waiting on a row lock, or on a server that went away, must not hold up the
    # shutdown: what it did not finish rolls back, and the next sweep (here or in a sibling)
    # does it. Whatever the cancelled sweep raises while unwinding is logged, not raised.
    done, _ = await asyncio.wait({task}, timeout=STORE_SWEEP_STOP_GRACE_S)
    if not done:
        log.warning("store sweep still running after %.0fs; cancelled", STORE_SWEEP_STOP_GRACE_S)
        task.cancel()
        await asyncio.wait({task}, timeout=STORE_SWEEP_STOP_GRACE_S)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("store sweep ended with %r", task.exception())
