"""The HTTP ceiling: a bare aiohttp + uvloop handler returning a small orjson body.

Served by ``workers`` processes sharing one port with SO_REUSEPORT, exactly like
``flashsale serve``, so that the benchmark compares like with like:

    python -m loadtests.ceiling --port 8099 --workers 2      # until SIGTERM / Ctrl-C

Every path answers ``200 {"data": {"status": "ok"}}``, whatever the method.

``--bare`` serves the same body from a bare uvloop protocol with httptools (llhttp), no
aiohttp at all: the floor of the join route, which ``gateway/fastjoin.py`` answers on
the connection the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Final, cast

import httptools
import orjson
from aiohttp import web

from stack import run_until_signalled, supervise

BODY = orjson.dumps({"data": {"status": "ok"}, "message": "ok"})


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


_BARE_ANSWER: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY)
)


class Bare(asyncio.Protocol):
    """HTTP/1.1 keep-alive, every request answered with ``BODY`` (bodies are read and
    dropped by httptools)."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        if self._transport is not None:
            self._transport.write(_BARE_ANSWER)


async def serve_bare(host: str, port: int) -> None:
    """The bare protocol on ``host:port`` with SO_REUSEPORT, until cancelled."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = await asyncio.get_running_loop().create_server(Bare, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def serve(port: int, workers: int, *, bare: bool = False) -> int:
    """Start ``workers`` worker processes on ``port``; return when signalled or one dies."""
    return supervise(
        [
            *(sys.executable, "-m", "loadtests.ceiling", "--port", str(port), "--worker"),
            *(["--bare"] if bare else []),
        ],
        dict(os.environ),
        workers,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bare aiohttp + uvloop HTTP ceiling")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker", action="store_true", help="run one worker in this process")
    p.add_argument("--bare", action="store_true", help="uvloop + httptools, no aiohttp")
    args = p.parse_args(argv)
    if args.worker:
        import uvloop

        if args.bare:
            uvloop.run(serve_bare("127.0.0.1", args.port))
        else:
            uvloop.run(run_until_signalled(create_app(), "127.0.0.1", args.port))
        return 0
    return serve(args.port, args.workers, bare=args.bare)


if __name__ == "__main__":
    sys.exit(main())
