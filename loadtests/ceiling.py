"""The HTTP ceiling: a bare aiohttp + uvloop handler returning a small orjson body.

Served by ``workers`` processes sharing one port with SO_REUSEPORT, exactly like
``flashsale serve``, so that the benchmark compares like with like:

    python -m loadtests.ceiling --port 8099 --workers 2      # until SIGTERM / Ctrl-C

Every path answers ``200 {"data": {"status": "ok"}}``, whatever the method.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson
from aiohttp import web

from stack.processes import run_until_signalled, supervise

BODY = orjson.dumps({"data": {"status": "ok"}, "message": "ok"})


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def serve(port: int, workers: int) -> int:
    """Start ``workers`` worker processes on ``port``; return when signalled or one dies."""
    return supervise(
        [sys.executable, "-m", "loadtests.ceiling", "--port", str(port), "--worker"],
        dict(os.environ),
        workers,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bare aiohttp + uvloop HTTP ceiling")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker", action="store_true", help="run one worker in this process")
    args = p.parse_args(argv)
    if args.worker:
        import uvloop

        uvloop.run(run_until_signalled(create_app(), "127.0.0.1", args.port))
        return 0
    return serve(args.port, args.workers)


if __name__ == "__main__":
    sys.exit(main())
