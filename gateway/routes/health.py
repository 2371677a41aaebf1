"""Liveness, readiness, metrics, the OpenAPI document and its docs page."""

from __future__ import annotations

import asyncio
from typing import Final, Literal

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from flashsale.auth import require_metrics_token
from flashsale.errors import NotReady, Unauthorized
from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.stores.tasks import STORE_ERRORS
from flashsale.timing import PROBE_TIMEOUT_S
from gateway import __version__, appkeys
from gateway.http import dumps, ok
from gateway.routes.dashboard import PAGE_HEADERS, asset
from gateway.routing import ROUTE_TABLE, Route, openapi_spec
from gateway.shapes import Answer


async def healthz(request: web.Request) -> web.Response:
    return ok({"status": "alive"})


_REDIS_DOWN: Final[tuple[type[BaseException], ...]] = (TimeoutError, *STORE_ERRORS)


async def check_redis(redis: Redis, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether Redis answers a ping in time; a lost store of any kind (a cluster client that
    reaches no node, the transport errors redis-py leaks, redis-py#4287) is "down"."""
    try:
        async with asyncio.timeout(timeout_s):
            with leaks_as_connection_errors():
                pong: object = await redis.ping()
            return bool(pong)
    except _REDIS_DOWN:
        return False


async def check_db(app: web.Application) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            one: object = await app[appkeys.DB].fetchval("SELECT 1")
            return one == 1
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    redis_ok, db_ok, kafka_ok = await asyncio.gather(
        check_redis(app[appkeys.REDIS]), check_db(app), app[appkeys.PRODUCER].ping(PROBE_TIMEOUT_S)
    )
    checks = {"redis": _word(redis_ok), "postgres": _word(db_ok), "kafka": _word(kafka_ok)}
    down = [name for name, state in checks.items() if state == "down"]
    provider = app[appkeys.SETTINGS].payment_provider  # "sandbox" pays with no money
    if down:
        raise NotReady(
            "not ready: " + ", ".join(down) + " down",
            data={"checks": checks, "down": down, "payment_provider": provider},
        )
    return ok({"checks": checks, "down": [], "payment_provider": provider}, message="ready")


def _word(up: bool) -> str:
    return "up" if up else "down"


async def metrics(request: web.Request) -> web.Response:
    require_metrics_token(
        request.headers.get("Authorization", ""), request.app[appkeys.SETTINGS].metrics_token
    )
    request.app[appkeys.REQUEST_STATS].flush()
    body, content_type = request.app[appkeys.METRICS].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def openapi(request: web.Request) -> web.Response:
    table: list[Route] = request.app[ROUTE_TABLE]
    spec = openapi_spec(table, version=__version__)
    return web.Response(body=dumps(spec), content_type="application/json")


# The pages' policy, but Swagger UI draws its icons from data: URIs in its stylesheet.
DOCS_HEADERS: Final = {
    **PAGE_HEADERS,
    "Content-Security-Policy": PAGE_HEADERS["Content-Security-Policy"].replace(
        "img-src 'self'", "img-src 'self' data:"
    ),
}


async def docs(request: web.Request) -> web.Response:
    """Swagger UI (vendored under gateway/static/vendor) over this gateway's document."""
    resp = asset("docs.html")
    resp.headers.update(DOCS_HEADERS)
    return resp


class Alive(Answer):
    status: Literal["alive"]


StoreState = Literal["up", "down"]


class Checks(Answer):
    redis: StoreState
    postgres: StoreState
    kafka: StoreState


class Ready(Answer):
    checks: Checks
    down: list[str]  # empty when ready (the 503 names what is down)
    payment_provider: str


ROUTES = [
    Route("GET", "/healthz", healthz, "Process is alive", tag="ops", answer=Alive),
    Route(
        "GET",
        "/readyz",
        readyz,
        "Redis, PostgreSQL and the broker are reachable",
        responses=(NotReady,),
        tag="ops",
        answer=Ready,
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics (Bearer FLASHSALE_METRICS_TOKEN when it is set)",
        responses=(Unauthorized,),
        tag="ops",
        envelope=False,
    ),
    Route("GET", "/api/v1/openapi.json", openapi, "This document", tag="ops", envelope=False),
    Route(
        "GET",
        "/api/v1/docs",
        docs,
        "This document as a page (Swagger UI)",
        tag="ops",
        envelope=False,
        success={200: "an HTML page"},
    ),
]
