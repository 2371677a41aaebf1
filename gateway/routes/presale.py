"""Presale (seed 001): campaigns, and presale orders with stock pre-occupation."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from flashsale import errors as E
from flashsale import presale
from flashsale.auth import Principal
from gateway import appkeys
from gateway.http import ok
from gateway.routing import Route
from gateway.shapes import (
    Answer,
    Body,
    CreatedFrom,
    CreatedTo,
    PathParams,
    Query,
    one_of,
    read_body,
    read_path,
    read_query,
)
from gateway.validation import INT32_MAX, date_bound, path_int


class NewCampaign(Body, kw_only=True):
    sku_id: Annotated[int, Meta(ge=1)]
    total: Annotated[int, Meta(ge=1, le=10_000_000)]
    price: Annotated[int, Meta(ge=0, le=10**12)] | None = None
    starts_at: datetime | None = None
    ends_at: datetime


class NewPreorder(Body, kw_only=True):
    product_id: Annotated[int, Meta(ge=1)]
    sku_id: Annotated[int, Meta(ge=1)] | None = None
    quantity: Annotated[int, Meta(ge=1, le=100)]
    user_id: Annotated[int, Meta(ge=1)] | None = None


class PreorderChange(Body):
    status: Annotated[str, one_of(s for s in presale.STATUSES if s != "pending")]
    version: Annotated[int, Meta(ge=1, le=INT32_MAX)] | None = None


class PreorderList(Query):
    user_id: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=2**62,
                description="whose orders (admins only for other users; default: the caller)",
            ),
        ]
        | None
    ) = None
    from_: CreatedFrom | None = msgspec.field(default=None, name="from")
    to: CreatedTo | None = None
    page: Annotated[int, Meta(ge=1, le=100_000, description="page number from 1")] = 1
    limit: Annotated[int, Meta(ge=1, le=100, description="page size, at most 100")] = 20


class Campaign(Answer):
    """A presale (``price`` in cents; ``available``: units not yet pre-occupied)."""

    id: int
    product_id: int
    sku_id: int
    price: int
    total: int
    preoccupied: int
    available: int
    starts_at: str
    ends_at: str


class Preorder(Answer):
    """A presale order (money in cents); ``expires_at``: when an unpaid one is cancelled
    (null once it is not pending)."""

    order_id: str
    presale_id: int
    user_id: int
    product_id: int
    sku_id: int
    quantity: int
    price: int
    total_amount: int
    status: Annotated[str, one_of(presale.STATUSES)]
    refunded_amount: int
    version: int
    created_at: str
    updated_at: str
    paid_at: str | None
    cancelled_at: str | None
    expires_at: str | None


class PreorderPage(Answer):
    orders: list[Preorder]
    total: int
    page: int
    limit: int


class PreorderPath(PathParams):
    what = "presale order"
    order_id: Annotated[str, Meta(pattern="[0-9]{1,40}")]


async def create_campaign(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, NewCampaign)
    out = await presale.create_campaign(
        request.app[appkeys.DB],
        principal,
        sku_id=body.sku_id,
        total=body.total,
        price_cents=body.price,
        starts_at=body.starts_at,
        ends_at=body.ends_at,
    )
    return ok(out, status=201, message="presale created")


async def get_campaign(request: web.Request) -> web.Response:
    campaign_id = path_int(request.match_info["id"], "presale")
    return ok(await presale.get_campaign(request.app[appkeys.DB], campaign_id))


async def create_preorder(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, NewPreorder)
    if body.user_id not in (None, principal.user_id):
        raise E.Forbidden("a presale order is placed for the caller only")
    out = await presale.create_order(
        request.app[appkeys.DB],
        order_id=request.app[appkeys.ORDER_IDS].next(principal.user_id),
        user_id=principal.user_id,
        product_id=body.product_id,
        sku_id=body.sku_id,
        quantity=body.quantity,
        hold_s=request.app[appkeys.SETTINGS].presale_hold_s,
        max_per_user_default=request.app[appkeys.SETTINGS].max_per_user_default,
    )
    return ok(out, status=201, message="presale order created")


async def update_preorder(request: web.Request, principal: Principal) -> web.Response:
    order_id = read_path(request, PreorderPath).order_id
    body = await read_body(request, PreorderChange)
    out = await presale.change_status(
        request.app[appkeys.DB], principal, order_id, body.status, version=body.version
    )
    return ok(out, message="status updated")


async def get_preorder(request: web.Request, principal: Principal) -> web.Response:
    return ok(
        await presale.get_order(
            request.app[appkeys.DB], principal, read_path(request, PreorderPath).order_id
        )
    )


async def list_preorders(request: web.Request, principal: Principal) -> web.Response:
    q = read_query(request, PreorderList)
    user_id = q.user_id
    if principal.role != "admin":
        if user_id not in (None, principal.user_id):
            raise E.Forbidden("you may only list your own presale orders")
        user_id = principal.user_id
    f = presale.OrderFilter(
        user_id=user_id,
        since=date_bound(q.from_, end=False),
        until=date_bound(q.to, end=True),
        page=q.page,
        limit=q.limit,
    )
    return ok(await presale.list_orders(request.app[appkeys.DB], f))


async def cancel_preorder(request: web.Request, principal: Principal) -> web.Response:
    out, changed = await presale.cancel_order(
        request.app[appkeys.DB], principal, read_path(request, PreorderPath).order_id
    )
    if not changed:
        return ok(out, message="already cancelled")
    return ok(out, message="cancelled and refunded" if out["refunded_amount"] else "cancelled")


route = partial(Route, tag="presale")
ROUTES = [
    route(
        "POST",
        "/api/v1/presales",
        create_campaign,
        "Open a presale of a SKU (the product's merchant or an admin)",
        auth="merchant",
        body=NewCampaign,
        success={201: "created"},
        answer=Campaign,
    ),
    route(
        "GET",
        "/api/v1/presales/{id}",
        get_campaign,
        "A presale with its available stock",
        responses=(E.PresaleNotFound,),
        answer=Campaign,
    ),
    route(
        "POST",
        "/api/v1/preorder",
        create_preorder,
        "Place a presale order (pre-occupies presale stock until expires_at unless paid)",
        auth="user",
        body=NewPreorder,
        success={201: "created"},
        responses=(
            E.Forbidden,
            E.PresaleNotFound,
            E.InsufficientStock,
            E.PresaleNotActive,
            E.PurchaseLimitExceeded,
        ),
        answer=Preorder,
    ),
    route(
        "GET",
        "/api/v1/preorder",
        list_preorders,
        "List presale orders",
        auth="user",
        query=PreorderList,
        responses=(E.Forbidden,),
        answer=PreorderPage,
    ),
    route(
        "GET",
        "/api/v1/preorder/{order_id}",
        get_preorder,
        "One presale order",
        auth="user",
        params=PreorderPath,
        answer=Preorder,
    ),
    route(
        "PUT",
        "/api/v1/preorder/{order_id}",
        update_preorder,
        "Change a presale order's status (paid→shipped→completed, or cancelled — a paid "
        "order is refunded in full; paid comes from a verified payment only)",
        auth="user",
        body=PreorderChange,
        responses=(E.Forbidden, E.PaymentRequired, E.InvalidTransition, E.VersionConflict),
        params=PreorderPath,
        answer=Preorder,
    ),
    route(
        "DELETE",
        "/api/v1/preorder/{order_id}",
        cancel_preorder,
        "Cancel a presale order and return its stock; a paid order is refunded in full in "
        "the same transaction",
        auth="user",
        responses=(E.InvalidTransition,),
        params=PreorderPath,
        answer=Preorder,
    ),
]
