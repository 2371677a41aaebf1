"""One error type, mapped by one middleware to the response envelope.

Every failure a client can see is an :class:`AppError` with a stable UPPER_SNAKE
``code``, an HTTP status and a ``retriable`` flag. Subclasses only fix defaults;
handlers raise them and never build error responses themselves.

This module is the whole catalogue: each code comes from exactly one class here (a raise
site may pass its own message, ``data`` or headers, never another code).
tests/test_errors_catalogue.py holds that.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    """Base of every client-visible failure."""

    code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        fields: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.fields = fields
        self.data = data
        self.headers = headers or {}


class BadRequest(AppError):
    code = "BAD_REQUEST"
    http_status = 400
    default_message = "bad request"


class InvalidJSON(AppError):
    code = "INVALID_JSON"
    http_status = 400
    default_message = "request body is not valid JSON"


class ValidationFailed(AppError):
    code = "VALIDATION_FAILED"
    http_status = 422
    default_message = "validation failed"


class Unauthorized(AppError):
    code = "AUTH_REQUIRED"
    http_status = 401
    default_message = "authentication required"


class Forbidden(AppError):
    code = "FORBIDDEN"
    http_status = 403
    default_message = "forbidden"


class NotFound(AppError):
    code = "NOT_FOUND"
    http_status = 404
    default_message = "not found"


class MethodNotAllowed(AppError):
    code = "METHOD_NOT_ALLOWED"
    http_status = 405
    default_message = "method not allowed"


class UnsupportedMediaType(AppError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415
    default_message = "unsupported media type"


class HttpError(AppError):
    """An HTTP error the web framework raised itself with no class of its own here."""

    code = "HTTP_ERROR"
    http_status = 400
    default_message = "HTTP error"


class Conflict(AppError):
    code = "CONFLICT"
    http_status = 409
    default_message = "conflict"


class PayloadTooLarge(AppError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413
    default_message = "request body too large"


class RateLimited(AppError):
    code = "RATE_LIMITED"
    http_status = 429
    retriable = True
    default_message = "too many requests"


class ServiceUnavailable(AppError):
    """A "no for now": every 503 tells the client when to retry (``Retry-After``)."""

    code = "RETRY_LATER"
    http_status = 503
    retriable = True
    default_message = "service temporarily unavailable, retry later"
    retry_after_s: ClassVar[int] = 1

    def __init__(
        self,
        message: str | None = None,
        *,
        fields: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = {"Retry-After": str(self.retry_after_s), **(headers or {})}
        super().__init__(message, fields=fields, data=data, headers=headers)


class NotReady(AppError):
    """A readiness probe's no: a store is out of reach (``data`` names which)."""

    code = "NOT_READY"
    http_status = 503
    retriable = True
    default_message = "not ready"


class ShopReadOnly(ServiceUnavailable):
    """The ``read-only`` plan is on (flashsale/plans.py): reads only, joins included."""

    code = "READ_ONLY"
    default_message = "the shop is read-only for now (an operator's plan); retry later"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "5"})


# --- accounts and tokens -----------------------------------------------------------------


class TokenExpired(Unauthorized):
    code = "TOKEN_EXPIRED"
    default_message = "token has expired"


class TokenMalformed(Unauthorized):
    code = "TOKEN_MALFORMED"
    default_message = "token is malformed"


class TokenInvalid(Unauthorized):
    code = "TOKEN_INVALID"
    default_message = "token signature is invalid"


class TokenRevoked(Unauthorized):
    code = "TOKEN_REVOKED"
    default_message = "token was revoked (logout, password or role change); log in again"


class RevocationUnavailable(ServiceUnavailable):
    code = "AUTH_UNAVAILABLE"
    default_message = "cannot check tokens right now (revocation list unreachable); retry later"


class InvalidCredentials(Unauthorized):
    """One answer for an unknown account and a wrong password, so logins enumerate nothing."""

    code = "INVALID_CREDENTIALS"
    default_message = "wrong login or password"


class AccountDisabled(Forbidden):
    code = "ACCOUNT_DISABLED"
    default_message = "this account is disabled"


class AccountExists(Conflict):
    code = "ACCOUNT_EXISTS"
    default_message = "an account with this email or phone already exists"


# --- catalog and stock -------------------------------------------------------------------


class SkuNotFound(NotFound):
    code = "SKU_NOT_FOUND"
    default_message = "sku not found"


class NotOnSale(Conflict):
    code = "NOT_ON_SALE"
    default_message = "this product is not on sale"


class InsufficientStock(Conflict):
    code = "INSUFFICIENT_STOCK"
    default_message = "not enough stock for this quantity"


class StockBelowReserved(Conflict):
    code = "STOCK_BELOW_RESERVED"
    default_message = "stock cannot go below the units held by unpaid orders"


class ProductInUse(Conflict):
    code = "PRODUCT_IN_USE"
    default_message = "unfinished orders reference this product"


class PurchaseLimitExceeded(Conflict):
    code = "PURCHASE_LIMIT_EXCEEDED"
    default_message = "this would hold more units of a SKU than one buyer may hold unpaid"


class OrderNotPaid(Conflict):
    code = "ORDER_NOT_PAID"
    default_message = "stock is consumed only through a paid order"


class OrderNotPending(Conflict):
    code = "ORDER_NOT_PENDING"
    default_message = "a hold can only be attached to an order awaiting payment"


class HoldExceedsOrder(Conflict):
    code = "HOLD_EXCEEDS_ORDER"
    default_message = "the hold is larger than what the order still needs of this SKU"


class HeldByOrder(Conflict):
    code = "HELD_BY_ORDER"
    default_message = "this reservation belongs to an unpaid order; cancel the order instead"


class ReservationNotActive(Conflict):
    code = "RESERVATION_NOT_ACTIVE"
    default_message = "the reservation is no longer active"


# --- cart, orders and presale ------------------------------------------------------------


class ReferenceGone(Conflict):
    code = "REFERENCE_GONE"
    default_message = (
        "a record this request refers to no longer exists (the account, a product, an address)"
    )


class CartFull(Conflict):
    code = "CART_FULL"
    default_message = "the cart holds the maximum number of items"


class ItemUnavailable(Conflict):
    code = "ITEM_UNAVAILABLE"
    default_message = "some selected items are no longer available"


class PriceChanged(Conflict):
    code = "PRICE_CHANGED"
    default_message = "the price of an item changed; review the order"


class IdempotencyInProgress(Conflict):
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "a request with this Idempotency-Key is still in progress; retry"


class IdempotencyMismatch(AppError):
    code = "IDEMPOTENCY_MISMATCH"
    http_status = 422
    default_message = "Idempotency-Key was used with a different request body"


class InvalidTransition(Conflict):
    code = "INVALID_TRANSITION"
    default_message = "illegal status transition"


class VersionConflict(Conflict):
    code = "VERSION_CONFLICT"
    default_message = "the order was changed by someone else; reload and retry"


class PresaleNotFound(NotFound):
    code = "PRESALE_NOT_FOUND"
    default_message = "no presale for this product"


class PresaleNotActive(Conflict):
    code = "PRESALE_NOT_ACTIVE"
    default_message = "the presale is not open"


class PaymentRequired(Forbidden):
    code = "PAYMENT_REQUIRED"
    default_message = "an order becomes paid only through a verified payment"


class PresaleOrderExpired(Conflict):
    code = "PRESALE_ORDER_EXPIRED"
    default_message = "the presale order's hold has expired; it can no longer be paid"


# --- coupons -----------------------------------------------------------------------------


class CouponNotApplicable(ValidationFailed):
    code = "COUPON_NOT_APPLICABLE"
    default_message = "the coupon does not apply to this order"


class CouponNotFound(NotFound):
    code = "COUPON_NOT_FOUND"
    default_message = "no such coupon"


class CouponLimitReached(Conflict):
    code = "COUPON_LIMIT_REACHED"
    default_message = "this coupon has been used the maximum number of times for this user"


class CouponSoldOut(Conflict):
    code = "COUPON_SOLD_OUT"
    default_message = "this coupon has run out"


class CouponExists(Conflict):
    code = "COUPON_EXISTS"
    default_message = "a coupon with this code already exists"


# --- payments ----------------------------------------------------------------------------


class PaymentProviderUnavailable(AppError):
    """No payment provider is configured (``FLASHSALE_PAYMENT_PROVIDER=none``)."""

    code = "PAYMENT_PROVIDER_UNAVAILABLE"
    http_status = 503
    default_message = "no payment provider is configured; payments cannot be taken"


class BadSignature(BadRequest):
    code = "BAD_SIGNATURE"
    default_message = "notification signature is invalid"


class UnknownPayment(NotFound):
    code = "UNKNOWN_PAYMENT"
    default_message = "unknown payment"


class OrderMismatch(Conflict):
    code = "ORDER_MISMATCH"
    default_message = "notification names another order"


class AmountMismatch(Conflict):
    code = "AMOUNT_MISMATCH"
    default_message = "the amount does not match what is due"


class OrderNotPayable(Conflict):
    code = "ORDER_NOT_PAYABLE"
    default_message = "payment cannot be applied to this order"


class RefundExceedsPaid(Conflict):
    code = "REFUND_EXCEEDS_PAID"
    default_message = "refund exceeds what was paid"


class ReturnRequired(Conflict):
    """After shipping, money goes back through a return the merchant or an admin approves."""

    code = "RETURN_REQUIRED"
    default_message = (
        "the order has shipped: request a return, a refund follows once it is approved"
    )


class FullRefundRequired(Conflict):
    """Before an order ships, money back cancels it: the refund is everything paid."""

    code = "FULL_REFUND_REQUIRED"
    default_message = (
        "the order has not shipped: a refund gives back everything paid and cancels it; "
        "send the refundable amount or leave refund_amount out"
    )


class NotPaidInFull(Conflict):
    """Goods ship only for an order paid in full with nothing refunded (but returns)."""

    code = "ORDER_NOT_PAID_IN_FULL"
    default_message = "the order is not paid in full"


# --- back office: addresses, returns ---------------------------------------------------


class AddressNotFound(NotFound):
    code = "ADDRESS_NOT_FOUND"
    default_message = "address not found"


class AddressRequired(Conflict):
    """An order ships somewhere: it cannot be paid or shipped without an address."""

    code = "ADDRESS_REQUIRED"
    default_message = (
        "this order has no shipping address: add one to your address book (or pass address_id)"
    )


class AddressBookFull(Conflict):
    code = "ADDRESS_BOOK_FULL"
    default_message = "the address book is full; delete an address first"


class ReturnInProgress(Conflict):
    code = "RETURN_IN_PROGRESS"
    default_message = "this order already has a return request waiting for a decision"


# --- flash sales -------------------------------------------------------------------------


class NotStarted(Conflict):
    code = "NOT_STARTED"
    default_message = "the sale has not started"


class SaleEnded(Conflict):
    code = "SALE_ENDED"
    default_message = "the sale has ended"


class SoldOut(Conflict):
    code = "SOLD_OUT"
    default_message = "sold out"


class LimitExceeded(Conflict):
    code = "LIMIT_EXCEEDED"
    default_message = "per-user limit reached for this sale"


class SaleRecovering(ServiceUnavailable):
    code = "SALE_RECOVERING"
    retriable = True
    default_message = (
        "the sale's stock is being recounted after a store restart; retry in a few seconds"
    )
    retry_after_s = 2


class OutcomeUnknownError(ServiceUnavailable):
    """The reservation may or may not have been made: never a "no"."""

    code = "OUTCOME_UNKNOWN"
    retriable = True
    default_message = (
        "we could not confirm this join: retry with the same Idempotency-Key, "
        "or look at your orders before joining again"
    )


# --- the waiting room of queued sales (flashsale/waitingroom/) ---


class NotAdmitted(Forbidden):
    """A join on a queued sale without a valid admission of this shopper to this sale."""

    code = "NOT_ADMITTED"
    default_message = "this sale has a waiting room: enter the queue and join when admitted"


class AdmissionExpired(Conflict):
    code = "ADMISSION_EXPIRED"
    default_message = "your admission window has passed"


class SaleNotQueued(Conflict):
    code = "SALE_NOT_QUEUED"
    default_message = "this sale has no waiting room: join it directly"


class QueueNotOpen(Conflict):
    code = "QUEUE_NOT_OPEN"
    default_message = "the waiting room is not open yet"


class TicketInvalid(Forbidden):
    code = "TICKET_INVALID"
    default_message = "queue ticket missing, malformed or not for this sale"


class EntryLimited(AppError):
    """A bot-defence limit of the sale refused the entry; ``data.reason`` names it."""

    code = "ENTRY_LIMITED"
    http_status = 429
    default_message = "too many entries"


class AccountTooNew(Forbidden):
    code = "ACCOUNT_TOO_NEW"
    default_message = "this account is too new to enter this sale"


class DeviceIdRequired(BadRequest):
    code = "DEVICE_ID_REQUIRED"
    default_message = "this sale needs the X-Device-Id header to enter"


class ProofRequired(Forbidden):
    """The sale asks for a proof of work; ``data`` carries a fresh challenge."""

    code = "PROOF_REQUIRED"
    default_message = "solve the challenge and enter again with its solution"


def error_codes() -> list[str]:
    """Every client-visible code of the catalogue."""
    found: set[str] = set()
    todo: list[type[AppError]] = [AppError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return sorted(found)


# --- the framework's own errors and the envelope ------------------------------------------

_BY_HTTP_STATUS: dict[int, type[AppError]] = {
    cls.http_status: cls
    for cls in (BadRequest, NotFound, MethodNotAllowed, PayloadTooLarge, UnsupportedMediaType)
}


def for_http_status(status: int) -> type[AppError]:
    """The class whose code names an HTTP error the web framework raised itself (routing,
    body size); :class:`HttpError` for a status with no class of its own."""
    return _BY_HTTP_STATUS.get(status, HttpError)


def ok_envelope(data: Any = None, *, status: int = 200, message: str = "ok") -> dict[str, Any]:
    """The body every success goes out in; :func:`envelope` is an error's."""
    return {"code": status, "message": message, "data": data}


def envelope(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    fields: dict[str, str] | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """The body every error goes out in: ``code`` is the HTTP status, ``error`` the
    catalogue's code; ``fields`` (bad input, by name) and ``request_id`` when there are."""
    payload: dict[str, Any] = {"code": status, "message": message, "error": code, "data": data}
    if fields:
        payload["fields"] = fields
    if request_id is not None:
        payload["request_id"] = request_id
    return payload
