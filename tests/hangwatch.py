"""A pytest plugin that shows where a hung test waits: pytest-timeout's thread method
prints the threads' stacks, but a test stuck on the event loop shows only
``run_until_complete``. Shortly before the timeout this prints every asyncio task's stack."""

from __future__ import annotations

import asyncio
import gc
import io
import sys
import threading
import time

import pytest

WARN_BEFORE_TIMEOUT_S = 15.0

_started: list[float] = []


def _dump_tasks() -> None:
    out = io.StringIO()
    out.write("\n+++ hangwatch: asyncio tasks of the hung test +++\n")
    for task in asyncio.all_tasks():
        out.write(f"\n--- {task!r}\n")
        task.print_stack(limit=25, file=out)
    sys.stderr.write(out.getvalue())
    sys.stderr.flush()


def _watch(limit_s: float) -> None:
    dumped_for = None
    while True:
        time.sleep(1.0)
        if not _started:
            continue
        started = _started[-1]
        if dumped_for != started and time.monotonic() - started > limit_s:
            dumped_for = started
            for obj in gc.get_objects():
                if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running():
                    obj.call_soon_threadsafe(_dump_tasks)


def pytest_configure(config: pytest.Config) -> None:
    timeout = float(config.getini("timeout") or 0)
    if timeout > WARN_BEFORE_TIMEOUT_S:
        threading.Thread(
            target=_watch, args=(timeout - WARN_BEFORE_TIMEOUT_S,), daemon=True
        ).start()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _started.append(time.monotonic())
