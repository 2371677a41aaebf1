"""Orders (seed 000 §3): create, list, detail and the state machine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import orders, payments
from flashsale.auth import Principal
from flashsale.errors import (
    AddressNotFound,
    AddressRequired,
    AppError,
    InsufficientStock,
    InvalidTransition,
    NotOnSale,
    NotPaidInFull,
    PriceChanged,
    RefundExceedsPaid,
    ReturnInProgress,
    SkuNotFound,
    ValidationFailed,
    VersionConflict,
)
from flashsale.orders import Actor, OrderLineRequest, returns
from gateway import appkeys
from gateway.flash_runtime import FLASH
from gateway.http import header_text, ok
from gateway.routes.addresses import ADDRESS_ALTS, Address, AddressId, order_address
from gateway.routes.payments import PaymentCreated, PayStatus, with_payment_page
from gateway.routing import Auth, Route, SignedInHandler
from gateway.shapes import (
    Answer,
    Body,
    PathParams,
    PathText,
    Query,
    one_of,
    or_none,
    read_body,
    read_optional_body,
    read_path,
    read_query,
)
from gateway.validation import INT32_MAX, INT64_MAX, Alt

SkuOrProduct = Annotated[int, Meta(ge=1)] | UnsetType


class OrderItem(Body, kw_only=True):
    sku_id: SkuOrProduct = UNSET
    product_id: SkuOrProduct = UNSET  # stands for its only SKU
    quantity: Annotated[int, Meta(ge=1, le=orders.MAX_LINE_QUANTITY)]
    price: Annotated[int, Meta(ge=0)] | UnsetType | None = UNSET
    alternatives = (
        Alt(("sku_id",), absent=("product_id",)),
        Alt(("product_id",), absent=("sku_id",)),
    )


class NewOrder(Body, kw_only=True):
    items: Annotated[list[OrderItem], Meta(min_length=1, max_length=100)]
    shipping_address: Address | UnsetType = UNSET
    address_id: AddressId | UnsetType = UNSET
    coupon_code: Annotated[str, Meta(max_length=64)] | UnsetType | None = UNSET
    alternatives = ADDRESS_ALTS


# The row version a client read: the change is refused (409 VERSION_CONFLICT) if it moved.
Version = Annotated[int, Meta(ge=1, le=INT32_MAX)] | None


class VersionBody(Body):
    version: Version = None


class CancelBody(Body):
    reason: Annotated[str, Meta(max_length=200)] = "cancelled by user"
    version: Version = None


class PayBody(Body):
    payment_method: Annotated[str, one_of(payments.METHOD_NAMES)]
    return_url: Annotated[str, Meta(max_length=2000)] | None = None
    address_id: (
        Annotated[
            int,
            Meta(
                ge=1,
                description="ship to this entry of the caller's address book (an order "
                "without an address takes the default one; with no default the payment is "
                "refused: 409 ADDRESS_REQUIRED)",
            ),
        ]
        | None
    ) = None


class ReturnLine(Body):
    sku_id: Annotated[int, Meta(ge=1)]
    quantity: Annotated[int, Meta(ge=1, le=orders.MAX_LINE_QUANTITY)]


class ReturnBody(Body):
    kind: Annotated[
        str,
        one_of(returns.KINDS),
        Meta(description="return: the goods come back (restocked on approval); refund: money only"),
    ]
    reason: Annotated[str, Meta(min_length=1, max_length=500)]
    amount: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=INT64_MAX,
                description="cents to refund; default: for a return what its lines are worth "
                "(less the discount in proportion), for a refund all not yet refunded",
            ),
        ]
        | None
    ) = None
    items: (
        Annotated[
            list[ReturnLine],
            Meta(
                min_length=1,
                max_length=100,
                description="kind return only: the lines coming back (default: all)",
            ),
        ]
        | None
    ) = None


class ShipBody(Body):
    shipping_company: Annotated[str, Meta(min_length=1, max_length=64)]
    tracking_number: Annotated[str, Meta(min_length=1, max_length=64)]
    estimated_delivery: Annotated[str, Meta(max_length=64)] | None = None
    version: Version = None


Kind = Literal["regular", "flash"]
Status = Annotated[str, one_of(orders.STATUSES)]


class OrderSummary(Answer):
    order_id: str
    kind: Kind
    status: Status
    total_amount: int
    discount_amount: int
    shipping_fee: int
    final_amount: int
    version: int
    created_at: str
    payment_deadline: str | None


class OrderPage(Answer):
    orders: list[OrderSummary]
    total: int
    page: int
    limit: int


class OrderCreated(Answer):
    """A new order (or, replayed, the one its Idempotency-Key made, as it is now) and its
    pending payment (``payment_id`` null when it has none any more)."""

    order_id: str
    status: Status
    total_amount: int
    discount_amount: int
    shipping_fee: int
    final_amount: int
    payment_id: str | None
    payment_url: str | None
    expires_at: str | None
    version: int


class OrderMoved(Answer):
    """An order after a step of its state machine."""

    order_id: str
    status: Status
    version: int


class OrderShipped(OrderMoved):
    shipping_company: str
    tracking_number: str
    estimated_delivery: str | None


class LineAmounts(Answer):
    """What every line of an order has (``price`` and ``subtotal`` in cents)."""

    product_id: int
    sku_id: int
    quantity: int
    price: int
    subtotal: int


class OrderLine(LineAmounts):
    """A line of an order in PostgreSQL: the item snapshot's fields are null for a line
    without one."""

    product_name: str | None
    sku_attributes: dict[str, Any] | None
    image: str | None
    snapshot_id: int | None


class ShippingInfo(Answer):
    """Where an order goes (its address snapshot, null parts where none) and how it
    travels."""

    name: str | None
    phone: str | None
    address: str | None
    region: str | None
    city: str | None
    detail: str | None
    postcode: str | None
    address_id: int | None
    shipping_company: str | None
    tracking_number: str | None
    estimated_delivery: str | None
    shipped_at: str | None
    delivered_at: str | None


class ReturnItem(Answer):
    sku_id: int
    quantity: int


class ReturnView(Answer):
    """A return request (amounts in cents)."""

    return_id: str
    order_id: str
    user_id: int
    kind: Annotated[str, one_of(returns.KINDS)]
    status: Annotated[str, one_of(returns.STATUSES)]
    reason: str
    amount: int
    approved_amount: int | None
    items: list[ReturnItem]
    decided_by: int | None
    decision_note: str | None
    refund_id: str | None
    restocked: bool
    created_at: str
    decided_at: str | None
    refunded_at: str | None


class PaymentInfo(Answer):
    """An order's payment: the successful one, else the newest."""

    payment_id: str
    method: str
    status: PayStatus
    amount: int
    transaction_id: str | None
    paid_at: str | None
    expires_at: str


class LogEntry(Answer):
    """A move of an order (``actor_id`` null for the system and the provider)."""

    actor_id: int | None
    actor_role: str
    from_status: str | None
    to_status: str
    note: str | None
    created_at: str


class OrderHead(Answer):
    """What every view of an order in PostgreSQL starts with
    (:func:`flashsale.orders.views.order_head`)."""

    order_id: str
    kind: Kind
    status: Status
    version: int
    created_at: str


class OrderDetail(OrderHead):
    """An order in PostgreSQL, in full (amounts in cents)."""

    updated_at: str
    total_amount: int
    discount_amount: int
    shipping_fee: int
    final_amount: int
    refunded_amount: int
    coupon_code: str | None
    payment_deadline: str | None
    cancelled_at: str | None
    cancel_reason: str | None
    completed_at: str | None
    items: list[OrderLine]
    shipping_info: ShippingInfo
    returns: list[ReturnView]
    payment_info: PaymentInfo | None


class ShopperLine(LineAmounts):
    """A line of the caller's order: the snapshot's fields are absent while a flash order
    is in flight."""

    product_name: str | UnsetType | None = UNSET
    sku_attributes: dict[str, Any] | UnsetType | None = UNSET
    image: str | UnsetType | None = UNSET
    snapshot_id: int | UnsetType | None = UNSET


class ShopperOrder(Answer):
    """One of the caller's orders: as :class:`OrderDetail` once it is in PostgreSQL; a
    flash order still in flight (``status`` queued) has the fields up to ``items``, and
    ``flash_sale_id``."""

    order_id: str
    kind: Kind
    status: Annotated[str, one_of((*orders.STATUSES, "queued"))]
    created_at: str
    total_amount: int
    payment_deadline: str | None
    items: list[ShopperLine]
    flash_sale_id: int | UnsetType = UNSET
    version: int | UnsetType = UNSET
    updated_at: str | UnsetType = UNSET
    discount_amount: int | UnsetType = UNSET
    shipping_fee: int | UnsetType = UNSET
    final_amount: int | UnsetType = UNSET
    refunded_amount: int | UnsetType = UNSET
    coupon_code: str | UnsetType | None = UNSET
    cancelled_at: str | UnsetType | None = UNSET
    cancel_reason: str | UnsetType | None = UNSET
    completed_at: str | UnsetType | None = UNSET
    shipping_info: ShippingInfo | UnsetType = UNSET
    returns: list[ReturnView] | UnsetType = UNSET
    payment_info: PaymentInfo | UnsetType | None = UNSET


MAX_IDEMPOTENCY_KEY = 128
STATUS_FILTER = (*orders.STATUSES, "pending")


StatusFilter = Annotated[
    str,
    one_of(STATUS_FILTER),
    Meta(
        description="pending (pending_payment), paid, shipped, delivered, completed, "
        "cancelled, refunded"
    ),
]


class OrderList(Query):
    status: StatusFilter | None = None
    page: Annotated[int, Meta(ge=1, le=10_000, description="page number, from 1")] = 1
    limit: Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")] = 10


class OrderPath(PathParams):
    what = "order"
    id: PathText


SQL_SINGLE_SKU = """
SELECT product_id, min(id) AS sku_id, count(*) AS skus FROM skus
WHERE product_id = ANY($1::bigint[]) GROUP BY product_id
"""


def path_order_id(request: web.Request) -> str:
    """The order id in the path of a route with ``params=OrderPath``."""
    return read_path(request, OrderPath).id


async def _lines(request: web.Request, items: list[OrderItem]) -> list[OrderLineRequest]:
    """Order lines from the body; a ``product_id`` stands for its only SKU."""
    by_product = [it.product_id for it in items if it.sku_id is UNSET]
    single: dict[int, int] = {}
    if by_product:
        for r in await request.app[appkeys.DB].fetch(SQL_SINGLE_SKU, by_product):
            if r["skus"] == 1:
                single[r["product_id"]] = r["sku_id"]
    lines = []
    errors: dict[str, str] = {}
    for i, it in enumerate(items):
        sku_id = single.get(it.product_id) if it.sku_id is UNSET else it.sku_id  # type: ignore[arg-type]
        if sku_id is None:
            errors[f"items[{i}].sku_id"] = "required: the product has several SKUs or none"
            continue
        lines.append(OrderLineRequest(sku_id, it.quantity, or_none(it.price)))
    if errors:
        raise ValidationFailed(fields=errors)
    return lines


async def create(request: web.Request, principal: Principal) -> web.Response:
    key = header_text(request, "Idempotency-Key", max_len=MAX_IDEMPOTENCY_KEY)
    body = await read_body(request, NewOrder)
    address = await order_address(
        request, principal.user_id, body.address_id, or_none(body.shipping_address)
    )
    result = await orders.create_order(
        request.app[appkeys.DB],
        request.app[appkeys.SETTINGS],
        request.app[appkeys.ORDER_IDS],
        user_id=principal.user_id,
        lines=await _lines(request, body.items),
        shipping_address=address,
        coupon_code=body.coupon_code or None,
        idempotency_key=key,
    )
    replay = result.pop("idempotent_replay", False)
    return ok(
        with_payment_page(request.app, result),
        status=200 if replay else 201,
        message="order exists" if replay else "order created",
    )


async def list_(request: web.Request, principal: Principal) -> web.Response:
    q = read_query(request, OrderList)
    status = "pending_payment" if q.status == "pending" else q.status
    return ok(
        await orders.list_orders(
            request.app[appkeys.DB], principal.user_id, status=status, page=q.page, limit=q.limit
        )
    )


async def detail(request: web.Request, principal: Principal) -> web.Response:
    app = request.app
    rt = app[FLASH]
    return ok(
        await orders.get_order(
            app[appkeys.DB], rt.redis, rt.cache.sales, path_order_id(request), principal.user_id
        )
    )


async def logs(request: web.Request, principal: Principal) -> web.Response:
    return ok(
        await orders.order_logs(
            request.app[appkeys.DB], path_order_id(request), Actor.of(principal)
        )
    )


async def _move(
    request: web.Request,
    principal: Principal,
    step: Callable[..., Awaitable[dict[str, Any]]],
    version: int | None,
    **details: Any,
) -> web.Response:
    """``step`` of the state machine on the order in the path, refused if the order is no
    longer at ``version`` (None: whatever its version)."""
    return ok(
        await step(
            request.app[appkeys.DB],
            path_order_id(request),
            Actor.of(principal),
            expected_version=version,
            **details,
        )
    )


async def cancel(request: web.Request, principal: Principal) -> web.Response:
    body = await read_optional_body(request, CancelBody)
    return await _move(request, principal, orders.cancel_order, body.version, reason=body.reason)


async def pay(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, PayBody)
    pay = await payments.create_payment(
        request.app[appkeys.DB],
        request.app[appkeys.SETTINGS],
        order_id=path_order_id(request),
        user_id=principal.user_id,
        method=body.payment_method,
        return_url=body.return_url,
        amount=None,
        address_id=body.address_id,
    )
    return ok(with_payment_page(request.app, pay))


async def ship(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, ShipBody)
    return await _move(
        request,
        principal,
        orders.ship_order,
        body.version,
        shipping_company=body.shipping_company,
        tracking_number=body.tracking_number,
        estimated_delivery=body.estimated_delivery,
    )


async def deliver(request: web.Request, principal: Principal) -> web.Response:
    body = await read_optional_body(request, VersionBody)
    return await _move(request, principal, orders.deliver_order, body.version)


async def confirm(request: web.Request, principal: Principal) -> web.Response:
    body = await read_optional_body(request, VersionBody)
    return await _move(request, principal, orders.confirm_order, body.version)


async def request_return(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, ReturnBody)
    out = await returns.request_return(
        request.app[appkeys.DB],
        path_order_id(request),
        Actor.of(principal),
        kind=body.kind,
        reason=body.reason,
        amount=body.amount,
        items=None if body.items is None else msgspec.to_builtins(body.items),
    )
    return ok(out, status=201, message="return requested")


route = partial(Route, auth="user", tag="orders")
# What every step of the state machine on an order answers with beyond the errors of its
# kind (404 for the order in the path, 422 for the body).
_STATE = (InvalidTransition, VersionConflict)


def _step(
    action: str,
    handler: SignedInHandler,
    summary: str,
    *,
    body: type[Body],
    responses: Sequence[type[AppError]],
    answer: Any,
    auth: Auth = "user",
    body_required: bool = True,
) -> Route:
    """``POST /api/v1/orders/{id}/<action>``: a step of the order's state machine."""
    return Route(
        "POST",
        f"/api/v1/orders/{{id}}/{action}",
        handler,
        summary,
        auth=auth,
        body=body,
        tag="orders",
        params=OrderPath,
        body_required=body_required,
        responses=(*_STATE, *responses),
        answer=answer,
    )


ROUTES = [
    route(
        "POST",
        "/api/v1/orders",
        create,
        "Create an order (reserves stock; send Idempotency-Key to make retries safe)",
        body=NewOrder,
        success={201: "order created"},
        responses=(InsufficientStock, PriceChanged, NotOnSale, SkuNotFound),
        answer=OrderCreated,
    ),
    route(
        "GET",
        "/api/v1/orders",
        list_,
        "The caller's orders",
        query=OrderList,
        answer=OrderPage,
    ),
    route(
        "GET",
        "/api/v1/orders/{id}",
        detail,
        "One of the caller's orders: items, shipping_info, payment_info",
        params=OrderPath,
        answer=ShopperOrder,
    ),
    route(
        "GET",
        "/api/v1/orders/{id}/logs",
        logs,
        "The operation log of an order",
        params=OrderPath,
        answer=list[LogEntry],
    ),
    _step(
        "cancel",
        cancel,
        "Cancel an unpaid order (body optional: reason, version)",
        body=CancelBody,
        body_required=False,
        responses=(NotPaidInFull,),
        answer=OrderMoved,
    ),
    _step(
        "pay",
        pay,
        "Pay an order: returns payment_id, payment_url and expires_in",
        body=PayBody,
        responses=(AddressNotFound, AddressRequired),
        answer=PaymentCreated,
    ),
    _step(
        "ship",
        ship,
        "Ship a paid order (merchant of its products, or admin)",
        auth="merchant",
        body=ShipBody,
        responses=(AddressRequired, NotPaidInFull),
        answer=OrderShipped,
    ),
    _step(
        "deliver",
        deliver,
        "Mark a shipped order delivered (merchant of its products, or admin)",
        auth="merchant",
        body=VersionBody,
        body_required=False,
        responses=(NotPaidInFull,),
        answer=OrderMoved,
    ),
    _step(
        "confirm",
        confirm,
        "Confirm receipt: shipped or delivered → completed (buyer)",
        body=VersionBody,
        body_required=False,
        responses=(NotPaidInFull,),
        answer=OrderMoved,
    ),
    route(
        "POST",
        "/api/v1/orders/{id}/returns",
        request_return,
        "Ask for a return (goods back) or a refund on a shipped, delivered or completed "
        "order. The return then moves return_requested → return_approved → refunded "
        "(merchant or admin approves; the refund runs at once) or return_requested → "
        "return_rejected; it is listed in the order's `returns`",
        body=ReturnBody,
        tag="returns",
        params=OrderPath,
        rules="items only with kind return; each line of the order, at most what is left to return",
        success={201: "return requested"},
        responses=(InvalidTransition, ReturnInProgress, RefundExceedsPaid),
        answer=ReturnView,
    ),
]
