"""Shutdown never hangs on a background loop that lost its cancellation."""

from __future__ import annotations

import asyncio

import pytest

from flashsale.stores import tasks

pytestmark = pytest.mark.unit


async def test_stop_ends_a_loop_that_swallowed_its_cancel() -> None:
    seen: list[bool] = []

    async def careless_loop() -> None:
        # what a client library did once: the cancel arrived mid-call and came out as its
        # own error, which the loop caught and carried on from
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if seen:
                    raise
                seen.append(tasks.cancel_requested())

    task = asyncio.create_task(careless_loop(), name="careless")
    await asyncio.sleep(0.01)
    await asyncio.wait_for(tasks.stop(task), timeout=10)  # a second cancel ends it
    assert task.cancelled() and seen == [True]


async def test_a_loop_that_asks_stops_on_the_first_cancel() -> None:
    async def careful_loop() -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if tasks.cancel_requested():
                    raise

    task = asyncio.create_task(careful_loop())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(tasks.stop(task), timeout=0.5)
    assert task.cancelled()
