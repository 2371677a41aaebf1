"""Stopping background tasks for sure.

A cancellation can be lost inside a library: a client that turns the ``CancelledError``
into its own connection error while it tears a socket down, or Python 3.11's
``asyncio.timeout`` when the cancel and the deadline land together. A loop that catches the
store's errors and carries on would then run forever, and the shutdown that awaits it would
hang. So every background loop asks :func:`cancel_requested` after catching an error, and
shutdown goes through :func:`stop`, which cancels again until the task ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

log = logging.getLogger(__name__)

RECANCEL_EVERY_S: Final = 1.0


def cancel_requested() -> bool:
    """True when the current task was asked to stop, even if the ``CancelledError`` was
    swallowed on the way (call it in a loop's ``except`` before carrying on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each second
    a task that lost its cancellation."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
        for task in pending:
            log.warning("task %s did not stop when cancelled; cancelling again", task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with %r", task.get_name(), task.exception())
