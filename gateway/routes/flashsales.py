"""Flash-sale routes: admin lifecycle, public state, and the join hot path."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType
from multidict import CIMultiDictProxy

from flashsale.auth import Principal
from flashsale.errors import (
    AdmissionExpired,
    IdempotencyMismatch,
    InsufficientStock,
    LimitExceeded,
    NotAdmitted,
    NotFound,
    NotStarted,
    RateLimited,
    SaleEnded,
    ServiceUnavailable,
    SkuNotFound,
    SoldOut,
    ValidationFailed,
)
from flashsale.flash import join as joining
from flashsale.flash import lifecycle
from flashsale.flash.buckets import MAX_BUCKETS
from flashsale.flash.cache import SaleState, iso_ms, now_ms
from flashsale.waitingroom.config import MODES, Bounds, settable
from flashsale.waitingroom.room import set_mode
from gateway import appkeys
from gateway.flash_runtime import FLASH
from gateway.http import header_value, ok, read_raw
from gateway.middlewares import request_id
from gateway.routing import Route
from gateway.shapes import (
    Answer,
    Body,
    PathParams,
    PathText,
    as_dict,
    decode_body,
    one_of,
    or_none,
    read_body,
)
from gateway.validation import INT64_MAX, Alt, path_int
from gateway.waitingroom_runtime import WAITING_ROOM

JOIN_PATH: Final = "/api/v1/flash-sales/{sale_id}/join"
# A queued sale's admission hands out its own join path (the sale page joins through it).
ADMITTED_JOIN_PATH: Final = JOIN_PATH + "/{admission}"
# What the dashboard counts as joins: the request metrics label a request by its template.
JOIN_PATHS: Final = (JOIN_PATH, ADMITTED_JOIN_PATH)


class AdmissionPath(PathParams):
    """The admission in a join path, as the document states it. The join takes the value as
    sent (not through read_path: gateway/fastjoin.py parses its own path) and the waiting
    room refuses a token it did not sign (NotAdmitted), whatever its shape."""

    what = "admission"
    admission: PathText


JOIN_TOKEN_HEADER = "X-Join-Token"  # noqa: S105 (a header name)


def _queue_meta(kind: type, bounds: Bounds) -> Meta:
    limits = {} if kind is bool else {"ge": bounds.min, "le": bounds.max}
    given = {k: kind(v) for k, v in limits.items() if v is not None}
    return Meta(**given, description=bounds.doc)


# A queued sale's own settings, as flashsale/waitingroom/config.py declares them (range and
# meaning once, there); each one left out keeps the sale's current value or the default.
QueueSettings = msgspec.defstruct(
    "QueueSettings",
    [
        (name, Annotated[kind, _queue_meta(kind, bounds)] | UnsetType, UNSET)
        for name, (kind, bounds) in settable().items()
    ],
    bases=(Body,),
)
SaleMode = Annotated[str, one_of(MODES)]
Quantity = Annotated[int, Meta(ge=1, le=1_000_000_000)]


class SaleCreate(Body, kw_only=True):
    sku_id: Annotated[int, Meta(ge=1)]
    flash_price: Annotated[int, Meta(ge=0, le=10**12)]
    quantity: Quantity
    per_user_limit: Annotated[int, Meta(ge=1, le=1_000_000)]
    start_at: datetime
    end_at: datetime
    payment_window_s: Annotated[int, Meta(ge=10, le=7 * 24 * 3600)] = 900
    mode: SaleMode = "open"
    queue: QueueSettings | UnsetType = UNSET  # type: ignore[valid-type]
    buckets: Annotated[
        int,
        Meta(
            ge=1,
            le=MAX_BUCKETS,
            description="split the stock over this many Redis Cluster slots (a sale bigger "
            "than one shard); fixed at create; open sales only",
        ),
    ] = 1


class SalePatch(Body, kw_only=True):
    alternatives = (Alt(("add_quantity",)), Alt(("end_at",)), Alt(("mode",)), Alt(("queue",)))

    add_quantity: Quantity | UnsetType = UNSET
    end_at: datetime | UnsetType = UNSET
    mode: SaleMode | UnsetType = UNSET
    queue: QueueSettings | UnsetType = UNSET  # type: ignore[valid-type]


class JoinBody(Body):
    quantity: Annotated[int, Meta(ge=1, le=joining.MAX_JOIN_QUANTITY)]
    address_id: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=INT64_MAX,
                description="an entry of the caller's address book; default: their default "
                "address (resolved after the join, checked at payment)",
            ),
        ]
        | None
    ) = None


class SaleProduct(Answer):
    id: int
    name: str
    sku_id: int
    original_price: int
    flash_price: int


class FlashSale(Answer):
    """A sale as shoppers see it (``SaleState.public``)."""

    flash_sale_id: int
    product: SaleProduct
    total_quantity: int
    sold_quantity: int
    remaining_quantity: int
    per_user_limit: int
    start_time: str
    end_time: str
    payment_window_s: int
    status: Literal["upcoming", "active", "sold_out", "ended"]
    mode: Literal["open", "queued"]


class JoinAccepted(Answer):
    order_id: str
    status: Literal["queued"]
    payment_deadline: str
    replayed: bool


_MAX_IDEMPOTENCY_KEY = 64
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def _queue_settings(queue: msgspec.Struct | UnsetType) -> dict[str, Any] | None:
    return None if queue is UNSET else as_dict(queue)


async def create(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, SaleCreate)
    if body.end_at <= body.start_at:
        raise ValidationFailed(fields={"end_at": "must be after start_at"})
    rt = request.app[FLASH]
    sale = await lifecycle.create_sale(
        request.app[appkeys.DB],
        rt.redis,
        rt.scripts,
        sku_id=body.sku_id,
        flash_price=body.flash_price,
        quantity=body.quantity,
        per_user_limit=body.per_user_limit,
        start_at=body.start_at,
        end_at=body.end_at,
        payment_window_s=body.payment_window_s,
        created_by=principal.user_id,
        mode=body.mode,
        queue_settings=_queue_settings(body.queue),
        buckets=body.buckets,
    )
    await rt.cache.refresh()
    return ok(sale, status=201, message="flash sale created")


async def patch(request: web.Request, principal: Principal) -> web.Response:
    sale_id = path_int(request.match_info["sale_id"], "flash sale")
    body = await read_body(request, SalePatch)
    queue = _queue_settings(body.queue)
    mode = or_none(body.mode)
    add = or_none(body.add_quantity)
    end_at = or_none(body.end_at)
    if not add and end_at is None and not mode and queue is None:
        raise ValidationFailed(fields={"add_quantity": "give add_quantity, end_at, mode or queue"})
    rt = request.app[FLASH]
    if mode or queue is not None:
        await set_mode(request.app[appkeys.DB], rt.redis, rt.scripts, sale_id, mode, queue)
    sale = await lifecycle.top_up(
        request.app[appkeys.DB], rt.redis, rt.scripts, sale_id, add or 0, end_at
    )
    await rt.cache.refresh()
    return ok(sale, message="flash sale updated")


async def close(request: web.Request, principal: Principal) -> web.Response:
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
    return client_ip_of(
        request.remote, request.headers, request.app[appkeys.SETTINGS].trusted_proxies
    )


def client_ip_of(
    remote: str | None, headers: CIMultiDictProxy[str], proxies: Sequence[IPNetwork]
) -> str:
    peer = remote or "unknown"
    if not proxies:
        return peer

    def trusted(ip: IPAddress) -> bool:
        return any(ip in net for net in proxies)

    peer_ip = _ip(peer)
    if peer_ip is None or not trusted(peer_ip):
        return peer
    # several header lines are one comma-separated list (RFC 9110 5.3): a client's own
    # line comes first, so reading only that one would let it name any address
    forwarded = ",".join(headers.getall("X-Forwarded-For", ()))
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    last = peer
    for hop in reversed(hops):  # the right-most address no trusted proxy vouches for
        ip = _ip(hop)
        if ip is None:  # no proxy of ours wrote that: the last one that did is charged
            return last
        if not trusted(ip):
            return hop
        last = hop
    return last


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


JOIN_ACCEPTED: Final = "accepted, order queued"


class JoinAnswer(NamedTuple):
    order_id: str
    data: dict[str, Any]


async def join(request: web.Request, principal: Principal) -> web.Response:
    info = request.match_info
    answer = await take_join(
        request.app,
        principal,
        request.headers,
        info["sale_id"],
        info.get("admission"),
        partial(read_raw, request),
        request.remote,
        request_id(request),
    )
    request[appkeys.ORDER_ID] = answer.order_id  # the access log line names the order
    return ok(answer.data, status=202, message=JOIN_ACCEPTED)


async def take_join(
    app: web.Application,
    principal: Principal,
    headers: CIMultiDictProxy[str],
    sale_id_text: str,
    admission: str | None,
    read_body: Callable[[], Awaitable[bytes]],
    remote: str | None,
    rid: str,
) -> JoinAnswer:
    """A join from what the HTTP request carries, whichever server parsed it: the aiohttp
    route above, or the connection protocol of :mod:`gateway.fastjoin` that serves the
    join route itself; both answer the same, checks in the same order (``principal``: the
    caller, verified first by the router or by that protocol)."""
    sale = await app[FLASH].cache.get(path_int(sale_id_text, "flash sale"))
    if sale is None:
        raise NotFound("flash sale not found")
    refuse_in_process(app, principal, headers, sale, admission)
    return await reserve(app, principal, headers, sale, read_body, remote, rid)


def refuse_in_process(
    app: web.Application,
    principal: Principal,
    headers: CIMultiDictProxy[str],
    sale: SaleState,
    admission: str | None,
) -> None:
    """The checks of a join its worker answers alone, once the sale is known: the
    window, the sold-out flag, the waiting room's admission. Synchronous, so that the
    connection protocol refuses a stampede without a task per join."""
    now = now_ms()
    if now < sale.start_ms:
        # only the start time: the whole public view formats two timestamps and builds a
        # dozen fields per refusal (16 µs against 1 µs, timeit)
        raise NotStarted(data={"start_time": iso_ms(sale.start_ms)})
    if now >= sale.end_ms or sale.closed:
        raise SaleEnded
    sold_out = sale.sold_out and not sale.recovering
    if sold_out and "Idempotency-Key" not in headers:
        # in-process, no Redis call; a keyed retry goes on to the script: it may hold an
        # order, and the batch's WAIT must confirm the replicas have it before it is told
        raise SoldOut
    if sale.mode == "queued":  # the waiting room's gate: an admission, checked in-process
        app[WAITING_ROOM].check_admission(
            sale,
            principal.user_id,
            admission if admission is not None else headers.get(JOIN_TOKEN_HEADER),
            in_path=admission is not None,
            now=now,
        )


async def reserve(
    app: web.Application,
    principal: Principal,
    headers: CIMultiDictProxy[str],
    sale: SaleState,
    read_body: Callable[[], Awaitable[bytes]],
    remote: str | None,
    rid: str,
) -> JoinAnswer:
    """The rest of a join that passed :func:`refuse_in_process`: its body, its key, the
    reservation and the event."""
    rt = app[FLASH]
    body = decode_body(await read_body(), JoinBody)  # the hot path: the body in one await
    key = header_value(headers, "Idempotency-Key", max_len=_MAX_IDEMPOTENCY_KEY)
    result = await joining.join(
        rt,
        sale=sale,
        user_id=principal.user_id,
        quantity=body.quantity,
        client_ip=client_ip_of(remote, headers, app[appkeys.SETTINGS].trusted_proxies),
        idempotency_key=key,
        order_id=app[appkeys.ORDER_IDS].next(principal.user_id),
        request_id=rid,
        address_id=body.address_id,
    )
    if sale.mode == "queued" and not result.replayed:
        app[appkeys.METRICS].queue_joined.inc()
    return JoinAnswer(
        result.order_id,
        {
            "order_id": result.order_id,
            "status": "queued",
            "payment_deadline": iso_ms(result.payment_deadline_ms),
            "replayed": result.replayed,
        },
    )


# The one handler behind both join paths: a queued sale's admission may come in either.
_JOIN_ERRORS: Final = (
    NotStarted,
    SaleEnded,
    SoldOut,
    LimitExceeded,
    InsufficientStock,
    NotAdmitted,
    AdmissionExpired,
    IdempotencyMismatch,
    RateLimited,
    ServiceUnavailable,
)
route = partial(Route, tag="flash-sales")
ROUTES = [
    route(
        "POST",
        "/api/v1/admin/flash-sales",
        create,
        "Create a flash sale (carves stock)",
        auth="admin",
        body=SaleCreate,
        rules="end_at after start_at",
        answer=FlashSale,
        success={201: "created"},
        responses=(SkuNotFound, InsufficientStock),
    ),
    route(
        "PATCH",
        "/api/v1/admin/flash-sales/{sale_id}",
        patch,
        "Top up a running sale and/or move its end",
        auth="admin",
        body=SalePatch,
        answer=FlashSale,
        responses=(SaleEnded, InsufficientStock),
    ),
    route(
        "POST",
        "/api/v1/admin/flash-sales/{sale_id}/close",
        close,
        "Close a sale early; unsold units return to the SKU",
        auth="admin",
        answer=FlashSale,
    ),
    route(
        "GET",
        "/api/v1/flash-sales/active",
        active,
        "Running and upcoming sales",
        answer=list[FlashSale],
    ),
    route(
        "GET",
        "/api/v1/flash-sales/{sale_id}",
        detail,
        "One sale's live state",
        answer=FlashSale,
    ),
    route(
        "POST",
        JOIN_PATH,
        join,
        "Join a sale: reserve and queue an order (optional Idempotency-Key header)",
        auth="user",
        body=JoinBody,
        answer=JoinAccepted,
        success={202: "queued"},
        responses=_JOIN_ERRORS,
    ),
    route(
        "POST",
        ADMITTED_JOIN_PATH,
        join,
        "Join a queued sale through the join path its admission handed out",
        auth="user",
        body=JoinBody,
        answer=JoinAccepted,
        params=AdmissionPath,
        success={202: "queued"},
        responses=_JOIN_ERRORS,
    ),
]
