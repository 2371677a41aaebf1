"""The worker's listening socket takes a crowd of connections at once (stack/listen.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import ClientSession, web

from stack.listen import ACCEPT_BATCH, AcceptAllSite

pytestmark = pytest.mark.unit

CROWD = 3 * ACCEPT_BATCH


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def test_a_crowd_of_connections_is_taken_in_a_few_turns_of_the_loop() -> None:
    """uvloop's own server takes one queued connection per turn of the loop, so a crowd
    that connects at once waits behind every request of every turn (seconds, under a
    stampede); this site takes them all at the next wake-ups."""
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = AcceptAllSite(runner, "127.0.0.1", 0, backlog=4 * CROWD)
    await site.start()
    server = runner.server
    assert server is not None
    port = site.port
    assert port != 0
    crowd: list[socket.socket] = []
    try:
        # the kernel completes each handshake into the listen queue: no turn of the loop yet
        crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(CROWD)]
        for _ in range(12):  # turns of the loop, not time: TCPSite takes 12 of them here
            await asyncio.sleep(0)
        assert len(server.connections) == CROWD
        async with ClientSession() as session, session.get(f"{site.name}/") as resp:
            assert (resp.status, await resp.text()) == (200, "hello")
    finally:
        for conn in crowd:
            conn.close()
        await runner.cleanup()
    with pytest.raises(ConnectionRefusedError):  # the site closed its socket
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
