"""The access log: one JSON line per request, in the shape of every other log line
(``ts``, ``level``, ``pid``, ``logger``, ``msg`` and the request's own fields), written
in batches.

Through ``logging`` a line cost a worker about 80 µs of CPU (a sold-out join: 82 µs per
request with the log off, 177 µs with it on; ``python -m loadtests.profile_join
--scenario soldout --set access_log=true``): a LogRecord, the handler's lock, the
formatter's walk over the record, and a write and a flush per line. Here a line is one
``orjson.dumps`` into a buffer, and the buffer goes to stderr in one write when it holds
64 KiB or 50 ms after its first line, and when the worker stops (nginx's ``access_log
... buffer= flush=``). A worker killed outright loses at most its last 50 ms of access
lines; the orders themselves are traced by the consumer's log lines too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from flashsale.timing import ACCESS_LOG_FLUSH_AFTER_S
from gateway.appkeys import ORDER_ID
from gateway.middlewares import REQUEST_ID

FLUSH_AT_BYTES: Final = 64 * 1024


def write_stderr(data: bytes) -> None:
    """All of ``data`` to file descriptor 2 (a pipe may take it in parts)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(2, view) :]
        except InterruptedError:
            continue
        except OSError:
            return  # stderr closed: an access line is not worth a failed request


class LineBuffer:
    """Lines gathered and handed to ``target`` in one piece."""

    def __init__(self, target: Callable[[bytes], None] = write_stderr) -> None:
        self.target = target
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, line: bytes) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a test): written at once
            loop = None
        if self._timer is not None and self._loop is not loop:
            self.flush()  # lines held for a loop that no longer runs go out first
        self._lines.append(line)
        self._size += len(line)
        if loop is None or self._size >= FLUSH_AT_BYTES:
            self.flush()
        elif self._timer is None:
            self._loop = loop
            self._timer = loop.call_later(ACCESS_LOG_FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            data = b"".join(self._lines)
            self._lines, self._size = [], 0
            self.target(data)


STDERR: Final = LineBuffer()


class _Clock:
    """``ts`` as the log formatter writes it, the date and time formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((now - second) * 1000):03d}+00:00"


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request: method, path, status, duration, request id, peer and,
    for a join, the order it made; on when the ``gateway.access`` logger takes INFO."""

    buffer: LineBuffer = STDERR

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._clock = _Clock()
        self._pid = os.getpid()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.line(
            request.method,
            request.path,
            response.status,
            time,
            response.headers.get(REQUEST_ID, ""),
            request.remote,
            request.get(ORDER_ID),
        )

    def line(
        self,
        method: str,
        path: str,
        status: int,
        seconds: float,
        rid: str,
        peer: str | None,
        order_id: str | None = None,
    ) -> None:
        line = {
            "ts": self._clock.now(),
            "level": "INFO",
            "pid": self._pid,
            "logger": self.logger.name,
            "msg": f"{method} {path} {status}",
            "method": method,
            "path": path,
            "status": status,
            "ms": round(seconds * 1000, 3),
            "request_id": rid,
            "peer": peer,
        }
        if order_id is not None:
            line["order_id"] = order_id
        self.buffer.add(orjson.dumps(line, default=str) + b"\n")

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
