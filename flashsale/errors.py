"""One error type, mapped by one middleware to the response envelope.

Every failure a client can see is an :class:`AppError` with a stable UPPER_SNAKE
``code``, an HTTP status and a ``retriable`` flag. Subclasses only fix defaults;
handlers raise them and never build error responses themselves.
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
        code: str | None = None,
        fields: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.error_code = code or self.code
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
    code = "RETRY_LATER"
    http_status = 503
    retriable = True
    default_message = "service temporarily unavailable, retry later"
