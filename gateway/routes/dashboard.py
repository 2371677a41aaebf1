"""The two pages people look at: the sale dashboard and the shopper's sale page.

The pages are static HTML + a little plain JavaScript (no framework) served from
``gateway/static``; uPlot is vendored there with its licence. The figures come from
:mod:`flashsale.dashboard` — one aggregate per second for all workers — streamed as
server-sent events to dashboards of an admin, or of the merchant whose product the
sale sells.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from importlib import resources
from typing import Annotated, Any, Final, Literal

import orjson
from aiohttp import web
from msgspec import Meta

from flashsale.auth import Principal, require_role
from flashsale.dashboard.hub import DashboardHub, open_hub
from flashsale.dashboard.sales import list_sales, sale_merchant
from flashsale.dashboard.snapshot import merchant_view
from flashsale.errors import AppError, NotFound, RateLimited, ServiceUnavailable
from flashsale.flash.cache import now_ms
from flashsale.stores import tasks
from flashsale.timing import EXPORT_EVERY_S, GAUGE_GRACE_MS, STREAM_KEEPALIVE_S, STREAM_REVALIDATE_S
from gateway import appkeys
from gateway.auth import bearer
from gateway.flash_runtime import FLASH
from gateway.http import ok
from gateway.plans_runtime import SWITCHES
from gateway.routes.flashsales import client_ip
from gateway.routing import ROLES_OF, Auth, Route
from gateway.shapes import Answer, PathParams, read_path
from gateway.streams import start_stream
from gateway.validation import path_int

HUB: Final = web.AppKey("dashboard_hub", DashboardHub)

_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".md": "text/plain",
    ".LICENSE": "text/plain",
}


class AssetPath(PathParams):
    what = "file"
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", max_length=64)]


# The pages load only their own scripts and styles, talk only to this origin and are never
# framed (clickjacking of the admin actions); the vendored uPlot styles through the CSSOM,
# which 'self' allows.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def _assets() -> dict[str, bytes]:
    """Every file under gateway/static, read once: name (``vendor/x`` for vendored) → bytes."""
    root = resources.files("gateway") / "static"
    out: dict[str, bytes] = {}
    for entry in root.iterdir():
        if entry.is_file():
            out[entry.name] = entry.read_bytes()
        elif entry.is_dir():
            for inner in entry.iterdir():
                if inner.is_file():
                    out[f"{entry.name}/{inner.name}"] = inner.read_bytes()
    return out


ASSETS: Final = _assets()


def _content_type(name: str) -> str:
    for suffix, kind in _TYPES.items():
        if name.endswith(suffix):
            return kind
    return "application/octet-stream"


def asset(name: str) -> web.Response:
    """A file of gateway/static (``vendor/x`` for a vendored one); an HTML page with the
    pages' headers."""
    body = ASSETS.get(name)
    if body is None:
        raise NotFound("no such file")
    resp = web.Response(body=body, content_type=_content_type(name), charset="utf-8")
    # the pages are revalidated on each load (a deploy shows at once); assets live 5 minutes
    html = name.endswith(".html")
    resp.headers["Cache-Control"] = "no-cache" if html else "public, max-age=300"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    if html:
        resp.headers.update(PAGE_HEADERS)
    return resp


async def dashboard_page(request: web.Request) -> web.Response:
    return asset("dashboard.html")


async def sale_page(request: web.Request) -> web.Response:
    path_int(request.match_info["sale_id"], "flash sale")
    return asset("sale.html")


async def static_file(request: web.Request) -> web.Response:
    return asset(read_path(request, AssetPath).name)


async def vendor_file(request: web.Request) -> web.Response:
    return asset("vendor/" + read_path(request, AssetPath).name)


async def _may_watch(request: web.Request, principal: Principal, sale_id: int) -> None:
    merchant = await sale_merchant(request.app[appkeys.DB], sale_id)
    # another merchant's sale answers as a missing one: a merchant learns nothing of it
    if merchant is None or (principal.role != "admin" and merchant != principal.user_id):
        raise NotFound("flash sale not found")


class DashboardSale(Answer):
    """A sale as a dashboard lists it (``remaining_quantity``: Redis's live count, null
    where the sale is not loaded there)."""

    flash_sale_id: int
    product_name: str
    sku_id: int
    flash_price: int
    merchant_id: int
    total_quantity: int
    remaining_quantity: int | None
    start_time: str
    end_time: str
    status: Literal["upcoming", "active", "sold_out", "ended", "closed"]


async def sales(request: web.Request, principal: Principal) -> web.Response:
    merchant = None if principal.role == "admin" else principal.user_id
    rows = await list_sales(
        request.app[appkeys.DB], request.app[appkeys.REDIS], merchant_id=merchant
    )
    return ok(rows)


def _event(name: str, data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# Who may watch a sale's events: the router checks it when the stream opens, and the stream
# again while it runs (_still_watching).
_WATCHERS: Final[Auth] = "merchant"


def _still_watching(request: web.Request, token: str) -> None:
    """Raise the error a new request with this token would get (expired, revoked, demoted)."""
    principal = request.app[appkeys.TOKENS].verify(token)
    roles = ROLES_OF[_WATCHERS]
    if roles is not None:
        require_role(principal, *roles)


async def events(request: web.Request, principal: Principal) -> web.StreamResponse:
    """Server-sent events: ``history`` (the last minutes) once, then ``snapshot`` each second.

    The token is checked again every ``STREAM_REVALIDATE_S``, as each request checks it: when it
    expires, or a logout or a role change revokes it, a ``closed`` event names the error
    and the stream ends (the page's reconnect then gets the 401).
    """
    token = bearer(request)
    assert token is not None  # the router verified it
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    await _may_watch(request, principal, sale_id)
    view = _as_is if principal.role == "admin" else merchant_view
    hub = request.app[HUB]
    slots = request.app[appkeys.STREAMS]
    with slots.hold(client_ip(request)):
        resp = await start_stream(request)
        ends = time.monotonic() + slots.max_s
        feed = hub.watch(sale_id, STREAM_REVALIDATE_S)
        try:
            await resp.write(_event("history", [view(p) for p in await hub.history(sale_id)]))
            quiet_since = time.monotonic()
            async for snap in feed:
                try:
                    _still_watching(request, token)
                except AppError as exc:
                    await resp.write(_event("closed", {"error": exc.code, "message": exc.message}))
                    break
                if snap is not None:
                    await resp.write(_event("snapshot", view(snap)))
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= STREAM_KEEPALIVE_S:
                    await resp.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                if time.monotonic() >= ends:
                    break  # the page reconnects (and its token is checked as on any request)
        except (ConnectionResetError, ConnectionError):
            pass  # the watcher went away
        finally:
            await feed.aclose()
    return resp


def _as_is(snap: dict[str, Any]) -> dict[str, Any]:
    return snap


async def _export_sales(app: web.Application) -> None:
    """Once a second: each running sale's remaining/allotment as gauges, from this worker's
    sale cache (no I/O), for Prometheus and Grafana."""
    metrics = app[appkeys.METRICS]
    cache = app[FLASH].cache

    async def export() -> None:
        now = now_ms()
        for sale in list(cache.sales.values()):
            if sale.closed or now >= sale.end_ms + GAUGE_GRACE_MS:
                continue
            label = str(sale.id)
            metrics.sale_remaining.labels(label).set(sale.remaining)
            metrics.sale_allotment.labels(label).set(sale.allotment)

    # errors=(): no I/O, so no store error to live through; a failure is a bug
    await tasks.guarded_loop(
        export, name="sale gauges", every_s=EXPORT_EVERY_S, errors=(), wait_first=True
    )


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    exporter = asyncio.create_task(_export_sales(app), name="sale-gauges")
    switches = app[SWITCHES]
    paused = lambda: switches.pause_background  # noqa: E731 - read per tick, no I/O
    async with open_hub(app[appkeys.DB], app[appkeys.REDIS], paused) as hub:
        app[HUB] = hub
        yield
    await tasks.stop(exporter)


async def end_streams(app: web.Application) -> None:
    """on_shutdown: end the open event streams, or the worker would wait for them to end."""
    hub = app.get(HUB)
    if hub is not None:
        await hub.close()


_PAGE = {200: "an HTML page"}
# The HTML pages and the files they load, outside the JSON envelope.
page = partial(Route, tag="pages", envelope=False, success=_PAGE)
ROUTES = [
    page(
        "GET",
        "/dashboard",
        dashboard_page,
        "The sale dashboard (HTML; logs in as an admin or a merchant)",
    ),
    page(
        "GET",
        "/sale/{sale_id}",
        sale_page,
        "A flash sale's shopper page (HTML)",
    ),
    page(
        "GET",
        "/static/{name}",
        static_file,
        "The pages' scripts and styles",
        params=AssetPath,
    ),
    page(
        "GET",
        "/static/vendor/{name}",
        vendor_file,
        "Vendored libraries (uPlot, MIT) with their licences",
        params=AssetPath,
    ),
    Route(
        "GET",
        "/api/v1/dashboard/sales",
        sales,
        "The sales a dashboard lists (a merchant sees its own)",
        auth="merchant",
        tag="dashboard",
        answer=list[DashboardSale],
    ),
    Route(
        "GET",
        "/api/v1/dashboard/sales/{sale_id}/events",
        events,
        "One sale's figures as server-sent events: history, then a snapshot each second",
        auth=_WATCHERS,
        tag="dashboard",
        envelope=False,
        success={
            200: "text/event-stream; a 'closed' event names the error when the token is "
            "revoked or expires"
        },
        responses=(RateLimited, ServiceUnavailable),
    ),
]
