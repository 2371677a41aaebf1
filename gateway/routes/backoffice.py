"""The back office: merchant orders (list, CSV export, detail, bulk shipping), returns
decisions, and the admin's order and account search."""

from __future__ import annotations

import csv
import io
from functools import partial
from typing import Annotated, Any, Final

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import users
from flashsale.auth import ROLES, Principal
from flashsale.errors import InvalidTransition, RefundExceedsPaid
from flashsale.orders import Actor, backoffice, returns
from flashsale.orders.backoffice import OrderQuery
from gateway import appkeys
from gateway.http import ok
from gateway.routes.orders import (
    Kind,
    LogEntry,
    OrderDetail,
    OrderHead,
    OrderLine,
    OrderPath,
    ReturnView,
    ShipBody,
    ShippingInfo,
    Status,
    StatusFilter,
    path_order_id,
)
from gateway.routes.orders import logs as order_logs
from gateway.routes.payments import PayStatus, RefundDone
from gateway.routes.users import Account
from gateway.routing import Route
from gateway.shapes import (
    Answer,
    Body,
    CreatedFrom,
    CreatedTo,
    PathParams,
    PathText,
    Query,
    as_dict,
    one_of,
    read_body,
    read_optional_body,
    read_path,
    read_query,
)
from gateway.validation import INT64_MAX, date_bound

Page = Annotated[int, Meta(ge=1, le=10_000, description="page number, from 1")]
Limit = Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")]
Sort = Annotated[str, one_of(backoffice.SORTS), Meta(description="newest or oldest first")]


class OrderFilters(Query):
    status: StatusFilter | None = None
    from_: CreatedFrom | None = msgspec.field(default=None, name="from")
    to: CreatedTo | None = None
    order_id: (
        Annotated[str, Meta(min_length=1, max_length=64, description="exactly this order")] | None
    ) = None


class MerchantFilters(OrderFilters):
    product_id: Annotated[int, Meta(ge=1, description="orders holding this product")] | None = None
    sort: Sort = "created_at,desc"


class MerchantList(MerchantFilters):
    page: Page = 1
    limit: Limit = 20


class AdminList(OrderFilters):
    sort: Sort = "created_at,desc"
    user_id: Annotated[int, Meta(ge=1, description="the buyer's id")] | None = None
    user: (
        Annotated[str, Meta(min_length=1, max_length=254, description="the buyer's email or phone")]
        | None
    ) = None
    page: Page = 1
    limit: Limit = 20


class UserList(Query):
    q: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=254,
                description="prefix of the email, phone or nickname (any case), or the exact id",
            ),
        ]
        | None
    ) = None
    role: Annotated[str, one_of(ROLES)] | None = None
    disabled: (
        Annotated[bool, Meta(description="true: only disabled accounts; false: only active")] | None
    ) = None
    page: Page = 1
    limit: Limit = 20


class ReturnsList(Query):
    status: Annotated[str, one_of(returns.STATUSES)] | None = None
    page: Page = 1
    limit: Limit = 20


class Shipment(ShipBody, kw_only=True):
    order_id: Annotated[str, Meta(min_length=1, max_length=64)]


class BulkShip(Body):
    shipments: Annotated[
        list[Shipment],
        Meta(
            min_length=1,
            max_length=backoffice.MAX_BULK_SHIP,
            description="each shipped on its own; one result per shipment, in order",
        ),
    ]


class Approval(Body):
    note: Annotated[str, Meta(max_length=500)] | None = None
    refund_amount: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=INT64_MAX,
                description="refund this instead (up to what is left paid); without it a return "
                "refunds what was asked, at most what its lines are worth",
            ),
        ]
        | None
    ) = None


class Rejection(Body):
    note: Annotated[
        str, Meta(min_length=1, max_length=500, description="why (the shopper sees it)")
    ]


class ReturnPath(PathParams):
    what = "return"
    return_id: PathText


CSV_COLUMNS: Final = (
    "order_id",
    "created_at",
    "status",
    "buyer_id",
    "items",
    "units",
    "amount_cents",
    "refunded_cents",
    "name",
    "phone",
    "address",
    "postcode",
    "shipping_company",
    "tracking_number",
    "shipped_at",
)
# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def _query(q: MerchantFilters | AdminList) -> OrderQuery:
    status = q.status
    paged = q if isinstance(q, MerchantList | AdminList) else None  # the export is not
    return OrderQuery(
        status="pending_payment" if status == "pending" else status,
        date_from=date_bound(q.from_, end=False),
        date_to=date_bound(q.to, end=True),
        order_id=q.order_id,
        product_id=q.product_id if isinstance(q, MerchantFilters) else None,
        user_id=q.user_id if isinstance(q, AdminList) else None,
        sort=q.sort or "created_at,desc",
        page=1 if paged is None else paged.page,
        limit=20 if paged is None else paged.limit,
    )


async def merchant_list(request: web.Request, p: Principal) -> web.Response:
    q = _query(read_query(request, MerchantList))
    return ok(await backoffice.merchant_orders(request.app[appkeys.DB], p.user_id, q))


def csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


async def merchant_export(request: web.Request, p: Principal) -> web.Response:
    q = _query(read_query(request, MerchantFilters))
    rows, truncated = await backoffice.merchant_export(request.app[appkeys.DB], p.user_id, q)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([csv_cell(r[c]) for c in CSV_COLUMNS])
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="orders.csv"',
            "X-Export-Truncated": "true" if truncated else "false",
        },
    )


async def merchant_detail(request: web.Request, p: Principal) -> web.Response:
    return ok(
        await backoffice.merchant_order(
            request.app[appkeys.DB], path_order_id(request), Actor.of(p)
        )
    )


async def ship_bulk(request: web.Request, p: Principal) -> web.Response:
    body = await read_body(request, BulkShip)
    shipments = [as_dict(s) for s in body.shipments]
    return ok(await backoffice.ship_many(request.app[appkeys.DB], Actor.of(p), shipments))


async def returns_list(request: web.Request, p: Principal) -> web.Response:
    q = read_query(request, ReturnsList)
    return ok(
        await returns.list_returns(
            request.app[appkeys.DB], Actor.of(p), status=q.status, page=q.page, limit=q.limit
        )
    )


async def approve(request: web.Request, p: Principal) -> web.Response:
    body = await read_optional_body(request, Approval)
    out = await returns.approve_return(
        request.app[appkeys.DB],
        read_path(request, ReturnPath).return_id,
        Actor.of(p),
        note=body.note,
        refund_amount=body.refund_amount,
    )
    return ok(out, message="refunded" if out["changed"] else "already approved")


async def reject(request: web.Request, p: Principal) -> web.Response:
    body = await read_body(request, Rejection)
    out = await returns.reject_return(
        request.app[appkeys.DB],
        read_path(request, ReturnPath).return_id,
        Actor.of(p),
        note=body.note,
    )
    return ok(out, message="rejected" if out["changed"] else "already rejected")


async def admin_list(request: web.Request, principal: Principal) -> web.Response:
    q = read_query(request, AdminList)
    return ok(await backoffice.admin_orders(request.app[appkeys.DB], _query(q), login=q.user))


async def admin_detail(request: web.Request, principal: Principal) -> web.Response:
    return ok(await backoffice.admin_order(request.app[appkeys.DB], path_order_id(request)))


async def admin_users(request: web.Request, principal: Principal) -> web.Response:
    q = read_query(request, UserList)
    return ok(
        await users.search_users(
            request.app[appkeys.DB],
            q=q.q,
            role=q.role,
            disabled=q.disabled,
            page=q.page,
            limit=q.limit,
        )
    )


class MerchantOrder(OrderHead):
    """An order as its merchant lists it: its own units and amount (cents); the buyer's
    contact is null unless the order is to be shipped or was (paid, nothing refunded, or
    later)."""

    buyer_id: int
    units: int
    amount: int
    refunded_amount: int
    has_address: bool
    shipping_info: ShippingInfo


class Paged(Answer):
    total: int
    page: int
    limit: int


class Sorted(Paged):
    sort: Annotated[str, one_of(backoffice.SORTS)]


class MerchantOrderPage(Sorted):
    orders: list[MerchantOrder]


class MerchantOrderDetail(OrderHead):
    """One order as its merchant sees it: its own lines (every line for an admin), their
    amount (cents), and the contact as in the list."""

    paid_at: str | None
    buyer_id: int
    items: list[OrderLine]
    amount: int
    refunded_amount: int
    payment_status: PayStatus | None
    shipping_info: ShippingInfo
    returns: list[ReturnView]
    logs: list[LogEntry]


class ShipOutcome(Answer):
    """One shipment's result: ``ok`` with the shipped order's state, or the code and message
    of its refusal."""

    order_id: str
    ok: bool
    error: str | UnsetType = UNSET
    message: str | UnsetType = UNSET
    status: Status | UnsetType = UNSET
    version: int | UnsetType = UNSET
    shipping_company: str | UnsetType = UNSET
    tracking_number: str | UnsetType = UNSET
    estimated_delivery: str | UnsetType | None = UNSET


class BulkShipped(Answer):
    shipped: int
    failed: int
    results: list[ShipOutcome]


class ReturnPage(Paged):
    returns: list[ReturnView]


class ReturnDecided(ReturnView):
    """The return after the decision; ``changed`` false when it was already decided so
    (nothing done), and an approval that refunded says how (``refund``)."""

    changed: bool
    refund: RefundDone | UnsetType = UNSET


class AdminOrderRow(Answer):
    order_id: str
    user_id: int
    kind: Kind
    status: Status
    total_amount: int
    discount_amount: int
    shipping_fee: int
    final_amount: int
    refunded_amount: int
    version: int
    created_at: str
    paid_at: str | None
    shipped_at: str | None
    tracking_number: str | None
    flash_sale_id: int | None


class AdminOrderPage(Sorted):
    orders: list[AdminOrderRow]


class AdminOrder(OrderDetail):
    user_id: int
    logs: list[LogEntry]


class AccountRow(Account):
    disabled_at: str | None
    created_at: str


class AccountPage(Paged):
    users: list[AccountRow]


return_route = partial(Route, auth="merchant", tag="returns")
route = partial(Route, tag="back-office")
ROUTES = [
    route(
        "GET",
        "/api/v1/merchant/orders",
        merchant_list,
        "The orders holding the caller's products (its lines only), filtered, sorted, paged",
        auth="merchant-only",
        query=MerchantList,
        answer=MerchantOrderPage,
    ),
    route(
        "GET",
        "/api/v1/merchant/orders/export",
        merchant_export,
        f"The same list as CSV (at most {backoffice.MAX_EXPORT_ROWS} rows; "
        "X-Export-Truncated says whether more matched)",
        auth="merchant-only",
        query=MerchantFilters,
        envelope=False,
    ),
    route(
        "POST",
        "/api/v1/merchant/orders/ship",
        ship_bulk,
        "Ship several paid orders, each with its carrier and tracking number",
        auth="merchant",
        body=BulkShip,
        answer=BulkShipped,
    ),
    route(
        "GET",
        "/api/v1/merchant/orders/{id}",
        merchant_detail,
        "One order as its merchant sees it: its lines, address, tracking, returns, log",
        auth="merchant",
        params=OrderPath,
        answer=MerchantOrderDetail,
    ),
    return_route(
        "GET",
        "/api/v1/merchant/returns",
        returns_list,
        "Returns of the caller's orders (every return for an admin), newest first",
        query=ReturnsList,
        answer=ReturnPage,
    ),
    return_route(
        "POST",
        "/api/v1/returns/{return_id}/approve",
        approve,
        "Approve a return: return_requested → return_approved → refunded (the provider "
        "refund runs at once; the goods of kind return are restocked). Repeating it "
        "changes nothing (changed: false)",
        body=Approval,
        body_required=False,
        params=ReturnPath,
        responses=(InvalidTransition, RefundExceedsPaid),
        answer=ReturnDecided,
    ),
    return_route(
        "POST",
        "/api/v1/returns/{return_id}/reject",
        reject,
        "Reject a return with a note: return_requested → return_rejected",
        body=Rejection,
        params=ReturnPath,
        responses=(InvalidTransition,),
        answer=ReturnDecided,
    ),
    route(
        "GET",
        "/api/v1/admin/orders",
        admin_list,
        "Every order: search by order id, buyer (user_id, or email/phone in user), status, date",
        auth="admin",
        query=AdminList,
        answer=AdminOrderPage,
    ),
    route(
        "GET",
        "/api/v1/admin/orders/{id}",
        admin_detail,
        "Any order in full, with its returns and operation log",
        auth="admin",
        params=OrderPath,
        answer=AdminOrder,
    ),
    route(
        "GET",
        "/api/v1/admin/orders/{id}/logs",
        order_logs,
        "The operation log of any order",
        auth="admin",
        params=OrderPath,
        answer=list[LogEntry],
    ),
    route(
        "GET",
        "/api/v1/admin/users",
        admin_users,
        "Accounts, searched by email/phone/nickname prefix or id, role, disabled; "
        "change one with PATCH /api/v1/admin/users/{user_id} (its tokens end)",
        auth="admin",
        query=UserList,
        answer=AccountPage,
    ),
]
