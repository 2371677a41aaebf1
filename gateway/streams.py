"""The event streams a worker holds open, bounded (the sale page's and the dashboard's).

An open stream costs a file descriptor, some memory and a write on every change of its
sale, so one address could otherwise open thousands and make every change cost the
worker that much more. Each worker admits at most ``per_address`` streams from one client
address (429 past it) and ``per_worker`` in all (503), both with ``Retry-After`` in the
header and in the envelope; a page refused a stream polls instead. Every stream also ends
after ``max_s`` (a page reconnects by itself), so nothing holds a slot for ever.

Counted per worker, in memory: a stream lives and dies with its worker, so the count is
exact with no store to keep in step; an address may hold ``per_address`` on each worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aiohttp import web

from flashsale.errors import RateLimited, ServiceUnavailable
from flashsale.settings import Settings
from flashsale.timing import STREAM_ADDRESS_RETRY_S, STREAM_WORKER_RETRY_S


class StreamSlots:
    """This worker's open event streams, per client address and in all."""

    def __init__(self, *, per_address: int, per_worker: int, max_s: float) -> None:
        self.per_address = per_address
        self.per_worker = per_worker
        self.max_s = max_s
        self.open = 0
        self._by_address: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamSlots:
        return cls(
            per_address=settings.stream_per_address,
            per_worker=settings.stream_per_worker,
            max_s=settings.stream_max_s,
        )

    def of(self, address: str) -> int:
        return self._by_address.get(address, 0)

    @contextlib.contextmanager
    def hold(self, address: str) -> Iterator[None]:
        """A slot for one stream from ``address`` while the block runs; 503 or 429 if none."""
        if self.open >= self.per_worker:
            raise ServiceUnavailable(
                "too many event streams open on this server; poll instead, or retry later",
                data={"retry_after_s": STREAM_WORKER_RETRY_S},
                headers={"Retry-After": str(STREAM_WORKER_RETRY_S)},
            )
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            raise RateLimited(
                f"at most {self.per_address} event streams from one address; close one or poll",
                data={"retry_after_s": STREAM_ADDRESS_RETRY_S},
                headers={"Retry-After": str(STREAM_ADDRESS_RETRY_S)},
            )
        self._by_address[address] = held + 1
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]


async def start_stream(request: web.Request, **headers: str) -> web.StreamResponse:
    """Send the headers of a server-sent event stream (no caching, no proxy buffering)."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        }
    )
    await resp.prepare(request)
    return resp
