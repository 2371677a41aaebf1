"""Payments (seed 000 §5); the sandbox provider's routes exist only when it is the provider."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Final, Literal

from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import payments
from flashsale.auth import Principal
from flashsale.errors import (
    AmountMismatch,
    BadSignature,
    FullRefundRequired,
    InvalidTransition,
    NotFound,
    OrderMismatch,
    OrderNotPayable,
    PaymentProviderUnavailable,
    PresaleOrderExpired,
    RefundExceedsPaid,
    ReturnRequired,
    UnknownPayment,
)
from flashsale.orders import Actor
from flashsale.settings import Settings
from gateway import appkeys
from gateway.http import ok, read_json
from gateway.routing import Route
from gateway.shapes import (
    Answer,
    Body,
    PathParams,
    PathText,
    one_of,
    read_body,
    read_path,
    spec_of,
)
from gateway.validation import validate

Url = Annotated[str, Meta(max_length=2000)] | None
OrderId = Annotated[str, Meta(min_length=1, max_length=64)]


class CreateBody(Body, kw_only=True):
    order_id: OrderId
    amount: Annotated[int, Meta(ge=0)] | None = None
    payment_method: Annotated[str, one_of(payments.METHOD_NAMES)]
    return_url: Url = None
    notify_url: Url = None


class Notification(Body, kw_only=True, forbid_unknown_fields=False):
    """A provider's notification: extra fields are allowed (providers add them); the
    signature covers them."""

    payment_id: Annotated[str, Meta(min_length=1, max_length=64)]
    order_id: Annotated[str, Meta(min_length=1, max_length=64)]
    status: Annotated[str, one_of(("success", "failed"))]
    amount: Annotated[int, Meta(ge=0)]
    transaction_id: Annotated[str, Meta(max_length=128)] | None = None
    paid_at: Annotated[str, Meta(max_length=64)] | None = None
    # printable ASCII: compared in constant time
    sign: Annotated[str, Meta(pattern="[\\x21-\\x7e]{1,256}")]


class PaymentPath(PathParams):
    what = "payment"
    payment_id: PathText


class RefundBody(Body, kw_only=True):
    order_id: OrderId
    refund_amount: (
        Annotated[
            int,
            Meta(ge=1, description="what is left paid (the default); anything else is refused"),
        ]
        | None
    ) = None
    reason: Annotated[str, Meta(min_length=1, max_length=200)]
    refund_account: Literal["original"] | None = None


SANDBOX_PAGE: Final = "/api/v1/payment/sandbox/{payment_id}"

PayStatus = Literal["pending", "success", "failed", "closed", "refunded"]


class PaymentMethod(Answer):
    """A way to pay; ``name`` is what a checkout shows (the project serves no brand art)."""

    method: str
    name: str
    available: bool  # whether the configured provider can take payments
    provider: str


class PaymentCreated(Answer):
    """The pending payment of an unpaid order (``payment_url``: null without a provider
    page; ``expires_in`` in seconds)."""

    payment_id: str
    order_id: str
    amount: int
    payment_method: str
    payment_url: str | None
    qr_code: None
    expires_in: int
    expires_at: str


class NotificationApplied(Answer):
    """A notification applied (or, ``duplicate``, already applied before: nothing more is
    said). A payment whose order can no longer take it is refunded at once
    (``payment_status`` refunded, with ``refund_id`` and ``refund_amount``)."""

    result: Literal["success"]
    duplicate: bool
    payment_id: str
    payment_status: Literal["success", "failed", "refunded"] | UnsetType = UNSET
    order_status: str | UnsetType = UNSET
    version: int | UnsetType = UNSET
    refund_id: str | UnsetType = UNSET
    refund_amount: int | UnsetType = UNSET


class RefundDone(Answer):
    """Money given back (cents) and the order after it; ``refunded_total`` is what the order
    has had back in all, ``refund_ids`` every refund when an admin gives back what the
    payments of a cancelled order kept."""

    refund_id: str
    order_id: str
    refund_amount: int
    status: Literal["completed"]
    estimated_arrival: str
    order_status: str
    version: int
    refunded_total: int | UnsetType = UNSET
    refund_ids: list[str] | UnsetType = UNSET


class PaymentView(Answer):
    payment_id: str
    order_id: str
    amount: int
    payment_method: str
    status: PayStatus
    provider: str
    transaction_id: str | None
    paid_at: str | None
    expires_at: str
    created_at: str


class SandboxPage(PaymentView):
    approve_url: str
    fail_url: str


class SignedNotification(Answer):
    """What the sandbox provider sent (``sign`` covers the other fields)."""

    payment_id: str
    order_id: str
    status: Literal["success", "failed"]
    amount: int
    transaction_id: str
    paid_at: str
    sign: str


class SandboxCompleted(Answer):
    notification: SignedNotification
    result: NotificationApplied


def with_payment_page(app: web.Application, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a pay order's) with ``payment_url``, where the payer pays: the sandbox's
    page when it is the provider; else None — with no provider there is no page (its routes
    are not mounted), and the payment is started with ``POST /payment/create``."""
    payment_id = data["payment_id"]
    sandbox = app[appkeys.SETTINGS].payment_provider == payments.SANDBOX
    data["payment_url"] = (
        SANDBOX_PAGE.format(payment_id=payment_id) if sandbox and payment_id else None
    )
    return data


async def methods(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    available = payments.provider_available(settings)
    return ok(
        [
            {**m, "available": available, "provider": settings.payment_provider}
            for m in payments.METHODS
        ]
    )


async def create(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, CreateBody)
    pay = await payments.create_payment(
        request.app[appkeys.DB],
        request.app[appkeys.SETTINGS],
        order_id=body.order_id,
        user_id=principal.user_id,
        method=body.payment_method,
        return_url=body.return_url,
        amount=body.amount,
    )
    return ok(with_payment_page(request.app, pay))


async def notify(request: web.Request) -> web.Response:
    # Extra fields are allowed (providers add them) and covered by the signature, which is
    # checked over the body exactly as sent: validation only checks its shape.
    body = await read_json(request)
    validate(body, spec_of(Notification))
    return ok(
        await payments.process_notification(
            request.app[appkeys.DB], request.app[appkeys.SETTINGS], body
        )
    )


async def sandbox_show(request: web.Request, principal: Principal) -> web.Response:
    pay = await payments.get_payment(
        request.app[appkeys.DB],
        request.app[appkeys.SETTINGS],
        read_path(request, PaymentPath).payment_id,
        principal.user_id,
        principal.role,
    )
    page = SANDBOX_PAGE.format(payment_id=pay["payment_id"])
    return ok(pay | {"approve_url": page + "/approve", "fail_url": page + "/fail"})


async def _sandbox_complete(
    request: web.Request, principal: Principal, *, approve: bool
) -> web.Response:
    return ok(
        await payments.sandbox_complete(
            request.app[appkeys.DB],
            request.app[appkeys.SETTINGS],
            read_path(request, PaymentPath).payment_id,
            principal.user_id,
            principal.role,
            approve=approve,
        )
    )


async def sandbox_approve(request: web.Request, principal: Principal) -> web.Response:
    return await _sandbox_complete(request, principal, approve=True)


async def sandbox_fail(request: web.Request, principal: Principal) -> web.Response:
    return await _sandbox_complete(request, principal, approve=False)


async def refund(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, RefundBody)
    return ok(
        await payments.refund(
            request.app[appkeys.DB],
            order_id=body.order_id,
            actor=Actor.of(principal),
            amount=body.refund_amount,
            reason=body.reason,
        )
    )


route = partial(Route, tag="payments")
ROUTES = [
    route(
        "GET",
        "/api/v1/payment/methods",
        methods,
        "Payment methods",
        answer=list[PaymentMethod],
    ),
    route(
        "POST",
        "/api/v1/payment/create",
        create,
        "Create (or switch the method of) the payment of an unpaid order: a regular, flash "
        "or presale order (a presale order is paid only this way)",
        auth="user",
        body=CreateBody,
        responses=(
            NotFound,
            InvalidTransition,
            AmountMismatch,
            PresaleOrderExpired,
            PaymentProviderUnavailable,
        ),
        answer=PaymentCreated,
    ),
    route(
        "POST",
        "/api/v1/payment/notify",
        notify,
        "Provider notification: sign = hex HMAC-SHA256 of every other field sent as compact "
        "sorted-key JSON",
        body=Notification,
        responses=(BadSignature, UnknownPayment, AmountMismatch, OrderMismatch),
        answer=NotificationApplied,
    ),
    route(
        "POST",
        "/api/v1/payment/refund",
        refund,
        "Refund everything left paid: before shipping this cancels the order (stock and "
        "coupon back; the shopper or an admin); after shipping an admin only (a shopper "
        "requests a return)",
        auth="user",
        body=RefundBody,
        responses=(
            NotFound,
            FullRefundRequired,
            RefundExceedsPaid,
            InvalidTransition,
            ReturnRequired,
        ),
        answer=RefundDone,
    ),
]

# The sandbox pays orders with no money: its routes are mounted only when it is the
# configured provider (FLASHSALE_PAYMENT_PROVIDER=sandbox), and are a 404 otherwise.
sandbox = partial(Route, auth="user", tag="payments", params=PaymentPath)
SANDBOX_ROUTES = [
    sandbox(
        "GET",
        SANDBOX_PAGE,
        sandbox_show,
        "Sandbox provider: the payment page",
        answer=SandboxPage,
    ),
    sandbox(
        "POST",
        SANDBOX_PAGE + "/approve",
        sandbox_approve,
        "Sandbox provider: approve the payment (sends the signed notification)",
        responses=(OrderNotPayable,),
        answer=SandboxCompleted,
    ),
    sandbox(
        "POST",
        SANDBOX_PAGE + "/fail",
        sandbox_fail,
        "Sandbox provider: fail the payment (sends the signed notification)",
        answer=SandboxCompleted,
    ),
]


def provider_routes(settings: Settings | None) -> list[Route]:
    """The routes of the configured payment provider (none unless it is the sandbox)."""
    if settings is not None and settings.payment_provider == payments.SANDBOX:
        return SANDBOX_ROUTES
    return []
