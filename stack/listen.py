"""A worker's listening socket: every queued connection accepted at each wake-up.

uvloop's server (libuv 1.52, as uvloop 0.23 bundles it) accepts one connection per turn of
the event loop. A worker answering a stampede on a thousand connections turns its loop
every few tens of milliseconds, so the connections a crowd opens at once wait in the
kernel's accept queue, one per turn: measured with 1,000 connections against a protocol
that spends 40 µs per request, the last of a worker's 500 connections was accepted 2.5 s
after the first, and wrk counted requests past its 2 s timeout on connections the server
had not yet taken (``python -m loadtests.bench``'s rows 4n; BENCHMARKS.md, "Many
connections"). asyncio's own loop accepts up to its backlog per wake-up and took the same
crowd in 70 ms. :class:`AcceptAllSite` does what asyncio does on uvloop: it watches the
socket itself, accepts what the kernel queued (up to :data:`ACCEPT_BATCH` per wake-up, so
that a flood of connections cannot starve the requests already in), and hands each
socket to the loop's ``connect_accepted_socket`` with the runner's protocol factory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Final

from aiohttp import web
from aiohttp.web_runner import BaseRunner

from flashsale.timing import ACCEPT_RETRY_DELAY_S

log = logging.getLogger(__name__)

# Connections taken per wake-up of the listening socket: asyncio's default backlog
# (100) is its figure; a turn of the loop answers every ready connection besides.
ACCEPT_BATCH: Final = 128
_OUT_OF_FILES: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class AcceptAllSite(web.BaseSite):
    """``web.TCPSite(runner, host, port, reuse_port=True, backlog=backlog)``, accepting
    every queued connection (up to :data:`ACCEPT_BATCH`) each time the socket is ready."""

    __slots__ = ("_accepting", "_connecting", "_host", "_port", "_retry", "_socks")

    def __init__(self, runner: BaseRunner, host: str, port: int, *, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._socks: list[socket.socket] = []
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[object]] = set()

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the asked one until started; the kernel's pick for 0)."""
        return int(self._socks[0].getsockname()[1]) if self._socks else self._port

    async def start(self) -> None:
        await super().start()
        infos = await asyncio.get_running_loop().getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        # every address the host name gives (``localhost``: both stacks), as TCPSite binds
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # the IPv4 address gets its own socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
            except OSError:
                sock.close()
                await self.stop()
                raise
            self._socks.append(sock)
        self._listen()

    def _listen(self) -> None:
        self._retry = None
        if not self._accepting:
            loop = asyncio.get_running_loop()
            for sock in self._socks:
                loop.add_reader(sock.fileno(), self._accept, sock)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            loop = asyncio.get_running_loop()
            for sock in self._socks:
                loop.remove_reader(sock.fileno())
            self._accepting = False

    def _accept(self, sock: socket.socket) -> None:
        server = self._runner.server
        if server is None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as exc:
                if exc.errno not in _OUT_OF_FILES:
                    raise
                # the connections already in keep being served; new ones wait in the
                # kernel's queue until descriptors are free again
                log.warning("cannot accept a connection (%s): retrying in 1 s", exc)
                self._pause()
                self._retry = loop.call_later(ACCEPT_RETRY_DELAY_S, self._listen)
                return
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(server, conn))
            self._connecting.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the peer left between the accept and the transport's set-up: nothing to serve
            log.debug("accepted connection lost at set-up: %r", task.exception())

    async def stop(self) -> None:
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._socks:
            sock.close()
        self._socks = []
        for task in self._connecting:  # not yet handed over: closed, as the server stops
            task.cancel()
        await super().stop()
