"""Background loops: one guarded loop, and stopping tasks for sure.

:func:`guarded_loop` is the shape of every loop that keeps a worker's state in step with
the stores (the sale cache, the waiting room, the revocation and plan followers, the
machine-id lease, the dashboard, the sweepers, the store probes and the plan trigger):
run a step every so often, live on when a store is out of reach, wait its interval before
trying again, and end when cancelled. The timers that do no I/O (the request-stats flush,
the sale gauges, the CPU sample, the consumer's heartbeat) run on it too, with
``errors=()``: there is no store error for them to live through.

A cancellation can be lost inside a library: a client that turns the ``CancelledError``
into its own connection error while it tears a socket down, or Python 3.11's
``asyncio.timeout`` when the cancel and the deadline land together. A loop that catches the
store's errors and carries on would then run forever, and the shutdown that awaits it would
hang. So the loop asks :func:`cancel_requested` after each step and each wait, and shutdown
goes through :func:`stop`, which cancels again until the task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

import asyncpg
from redis.exceptions import RedisClusterException, RedisError

from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.timing import TASK_RECANCEL_EVERY_S

log = logging.getLogger(__name__)

#: What a loop over Redis lives through: the store out of reach, or its connection lost.
# RedisClusterException (a cluster client that reached none of its nodes: every host of a
# partitioned worker's side) is not a RedisError, and a loop it ended served stale state.
STORE_ERRORS: Final[tuple[type[BaseException], ...]] = (RedisError, RedisClusterException, OSError)
#: The same for a loop that also reads PostgreSQL: its errors, or its connection lost under a
# statement (asyncpg's InterfaceError).
STORE_OR_DATABASE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    *STORE_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def cancel_requested() -> bool:
    """True when the current task was asked to stop, even if the ``CancelledError`` was
    swallowed on the way (call it in a loop's ``except`` before carrying on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@contextlib.contextmanager
def guarded(what: str, errors: tuple[type[BaseException], ...] = STORE_ERRORS) -> Iterator[None]:
    """Inside, one of ``errors`` is logged and swallowed (the next round tries again), a
    connection redis-py lost under a command counts as its ConnectionError (redis-py#4287:
    it leaks the transport's AttributeError/TypeError/RuntimeError instead), and a
    cancellation swallowed on the way is raised again."""
    try:
        with leaks_as_connection_errors():
            yield
    except errors as exc:
        if cancel_requested():
            raise asyncio.CancelledError from None
        log.warning("%s failed: %s", what, exc)


async def guarded_loop(
    step: Callable[[], Awaitable[object]],
    *,
    name: str,
    every_s: float | Callable[[], float],
    errors: tuple[type[BaseException], ...] = STORE_ERRORS,
    wait_first: bool = False,
    stop: asyncio.Event | None = None,
    wake: asyncio.Event | None = None,
) -> None:
    """Await ``step()`` then wait ``every_s`` (a number, or a function giving the next wait),
    round after round, until the task is cancelled or ``stop`` is set.

    A step that raises one of ``errors`` is logged under ``name`` and tried again after the
    wait, never at once; any other error ends the loop (a bug: let it show). ``wait_first``
    waits before the first step; ``wake``, when set, ends a wait early (and is cleared)."""
    if stop is not None and wake is not None:
        raise ValueError("a loop waits on stop or on wake, not both")
    if wait_first:
        await _pause(every_s, stop or wake, clear=wake is not None)
    while stop is None or not stop.is_set():
        with guarded(name, errors):
            await step()
        if cancel_requested():  # swallowed inside the step without an error
            raise asyncio.CancelledError
        await _pause(every_s, stop or wake, clear=wake is not None)


async def _pause(
    every_s: float | Callable[[], float], event: asyncio.Event | None, clear: bool
) -> None:
    seconds = every_s() if callable(every_s) else every_s
    if event is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    if cancel_requested():  # 3.11's timeout can turn a cancel into TimeoutError
        raise asyncio.CancelledError
    if clear:
        event.clear()


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each second
    a task that lost its cancellation."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=TASK_RECANCEL_EVERY_S)
        for task in pending:
            log.warning("task %s did not stop when cancelled; cancelling again", task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with %r", task.get_name(), task.exception())
