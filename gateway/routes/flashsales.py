"""Flash-sale routes: admin lifecycle, public state, and the join hot path."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any

from aiohttp import web

from flashsale.auth import require_role
from flashsale.errors import NotFound, NotStarted, SaleEnded, SoldOut, ValidationFailed
from flashsale.flash import join as joining
from flashsale.flash import lifecycle
from flashsale.flash.cache import iso_ms, now_ms
from gateway import appkeys
from gateway.auth import authenticate
from gateway.flash_runtime import FLASH
from gateway.http import ok, read_json
from gateway.middlewares import request_id
from gateway.routing import Route
from gateway.validation import Alt, F, Obj, path_int, validate

CREATE = {
    "sku_id": F(int, min=1),
    "flash_price": F(int, min=0, max=10**12),
    "quantity": F(int, min=1, max=1_000_000_000),
    "per_user_limit": F(int, min=1, max=1_000_000),
    "start_at": F(datetime),
    "end_at": F(datetime),
    "payment_window_s": F(int, min=10, max=7 * 24 * 3600, default=900),
}
PATCH = Obj(
    {
        "add_quantity": F(int, required=False, min=1, max=1_000_000_000),
        "end_at": F(datetime, required=False),
    },
    alts=(Alt(("add_quantity",)), Alt(("end_at",))),
)
JOIN = {"quantity": F(int, min=1, max=joining.MAX_JOIN_QUANTITY)}
_MAX_IDEMPOTENCY_KEY = 64


def _admin(request: web.Request) -> int:
    principal = require_role(authenticate(request, request.app[appkeys.TOKENS]), "admin")
    return principal.user_id


async def create(request: web.Request) -> web.Response:
    admin_id = _admin(request)
    body = validate(await read_json(request), CREATE)
    if body["end_at"] <= body["start_at"]:
        raise ValidationFailed(fields={"end_at": "must be after start_at"})
    rt = request.app[FLASH]
    sale = await lifecycle.create_sale(
        request.app[appkeys.DB],
        rt.redis,
        rt.scripts,
        sku_id=body["sku_id"],
        flash_price=body["flash_price"],
        quantity=body["quantity"],
        per_user_limit=body["per_user_limit"],
        start_at=body["start_at"],
        end_at=body["end_at"],
        payment_window_s=body["payment_window_s"],
        created_by=admin_id,
    )
    await rt.cache.refresh()
    return ok(sale, status=201, message="flash sale created")


async def patch(request: web.Request) -> web.Response:
    _admin(request)
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    body = validate(await read_json(request), PATCH)
    if not body.get("add_quantity") and body.get("end_at") is None:
        raise ValidationFailed(fields={"add_quantity": "give add_quantity and/or end_at"})
    rt = request.app[FLASH]
    sale = await lifecycle.top_up(
        request.app[appkeys.DB],
        rt.redis,
        rt.scripts,
        sale_id,
        body.get("add_quantity") or 0,
        body.get("end_at"),
    )
    await rt.cache.refresh()
    return ok(sale, message="flash sale updated")


async def close(request: web.Request) -> web.Response:
    _admin(request)
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    rt = request.app[FLASH]
    sale = await lifecycle.close_sale(request.app[appkeys.DB], rt.redis, rt.scripts, sale_id)
    await rt.cache.refresh()
    return ok(sale, message="flash sale closed")


async def active(request: web.Request) -> web.Response:
    now = now_ms()
    sales = request.app[FLASH].cache.sales.values()
    data = [
        s.public(now)
        for s in sorted(sales, key=lambda s: (s.start_ms, s.id))
        if not s.closed and s.end_ms > now
    ]
    return ok(data)


async def detail(request: web.Request) -> web.Response:
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    state = await request.app[FLASH].cache.get(sale_id)
    if state is None:
        raise NotFound("flash sale not found")
    return ok(state.public(now_ms()))


def client_ip(request: web.Request) -> str:
    """The socket peer, or the X-Forwarded-For client when the peer is a trusted proxy."""
    peer = request.remote or "unknown"
    proxies = request.app[appkeys.SETTINGS].trusted_proxies
    if not proxies:
        return peer

    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in proxies)

    if not trusted(peer):
        return peer
    # several header lines are one comma-separated list (RFC 9110 5.3): a client's own
    # line comes first, so reading only that one would let it name any address
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):  # the right-most address no trusted proxy vouches for
        if not trusted(hop):
            return hop
    return hops[0] if hops else peer


async def join(request: web.Request) -> web.Response:
    app = request.app
    principal = authenticate(request, app[appkeys.TOKENS])
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    rt = app[FLASH]
    sale = await rt.cache.get(sale_id)
    if sale is None:
        raise NotFound("flash sale not found")
    now = now_ms()
    if now < sale.start_ms:
        raise NotStarted(data={"start_time": sale.public(now)["start_time"]})
    if now >= sale.end_ms or sale.closed:
        raise SaleEnded
    if sale.remaining <= 0 and not sale.recovering:
        raise SoldOut
    body: Any = await read_json(request)
    if type(body) is dict and len(body) == 1 and type(body.get("quantity")) is int:
        quantity = body["quantity"]  # the common shape, checked without the generic validator
        if not 1 <= quantity <= joining.MAX_JOIN_QUANTITY:
            validate(body, JOIN)
    else:
        quantity = validate(body, JOIN)["quantity"]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY:
        raise ValidationFailed(fields={"Idempotency-Key": "must be 1 to 64 characters"})
    result = await joining.join(
        rt,
        sale=sale,
        user_id=principal.user_id,
        quantity=quantity,
        client_ip=client_ip(request),
        idempotency_key=key,
        order_id=app[appkeys.ORDER_IDS].next(principal.user_id),
        request_id=request_id(request),
    )
    request[appkeys.ORDER_ID] = result.order_id  # the access log line names the order
    return ok(
        {
            "order_id": result.order_id,
            "status": "queued",
            "payment_deadline": iso_ms(result.payment_deadline_ms),
            "replayed": result.replayed,
        },
        status=202,
        message="accepted, order queued",
    )


ROUTES = [
    Route(
        "POST",
        "/api/v1/admin/flash-sales",
        create,
        "Create a flash sale (carves stock)",
        auth="admin",
        body=CREATE,
        rules="end_at after start_at",
        tag="flash-sales",
        responses={
            201: "created",
            404: "SKU_NOT_FOUND",
            409: "INSUFFICIENT_STOCK",
            422: "VALIDATION_FAILED",
        },
    ),
    Route(
        "PATCH",
        "/api/v1/admin/flash-sales/{sale_id}",
        patch,
        "Top up a running sale and/or move its end",
        auth="admin",
        body=PATCH,
        tag="flash-sales",
        responses={409: "SALE_ENDED or INSUFFICIENT_STOCK"},
    ),
    Route(
        "POST",
        "/api/v1/admin/flash-sales/{sale_id}/close",
        close,
        "Close a sale early; unsold units return to the SKU",
        auth="admin",
        tag="flash-sales",
    ),
    Route(
        "GET", "/api/v1/flash-sales/active", active, "Running and upcoming sales", tag="flash-sales"
    ),
    Route(
        "GET", "/api/v1/flash-sales/{sale_id}", detail, "One sale's live state", tag="flash-sales"
    ),
    Route(
        "POST",
        "/api/v1/flash-sales/{sale_id}/join",
        join,
        "Join a sale: reserve and queue an order (optional Idempotency-Key header)",
        auth="user",
        body=JOIN,
        tag="flash-sales",
        responses={
            202: "queued",
            404: "unknown sale",
            409: "NOT_STARTED, SALE_ENDED, SOLD_OUT, LIMIT_EXCEEDED, INSUFFICIENT_STOCK",
            422: "VALIDATION_FAILED or IDEMPOTENCY_MISMATCH",
            429: "RATE_LIMITED (Retry-After)",
            503: "RETRY_LATER",
        },
    ),
]
