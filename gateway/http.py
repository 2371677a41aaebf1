"""Response envelope and request-body helpers shared by every handler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from flashsale.errors import InvalidJSON, PayloadTooLarge, ValidationFailed, ok_envelope

JSON_CONTENT_TYPE = "application/json"


def _default(value: Any) -> Any:
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)


def ok(
    data: Any = None,
    *,
    status: int = 200,
    message: str = "ok",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The success envelope ``{"code", "message", "data"}``."""
    body = dumps(ok_envelope(data, status=status, message=message))
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def header_text(request: web.Request, name: str, *, max_len: int) -> str | None:
    """The value of a header the service reads (None when absent), or 422 naming it.

    aiohttp hands bytes that are not UTF-8 over as lone surrogates, which no encoder takes
    (Redis, PostgreSQL, JSON, the reply's own headers): a value is 1 to ``max_len``
    printable ASCII characters, checked before anything is written.
    """
    return header_value(request.headers, name, max_len=max_len)


def header_value(headers: Mapping[str, str], name: str, *, max_len: int) -> str | None:
    """:func:`header_text` of a header mapping."""
    value = headers.get(name)
    if value is not None and not (0 < len(value) <= max_len and printable_ascii(value)):
        raise ValidationFailed(fields={name: f"must be 1 to {max_len} printable ASCII characters"})
    return value


def printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


async def read_raw(request: web.Request) -> bytes:
    """The body's bytes, or 413 if too large."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge from None


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body: 400 INVALID_JSON if it does not parse, 413 if too large."""
    return parse_json(await read_raw(request))


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or 400 INVALID_JSON."""
    if not raw:
        raise InvalidJSON("request body is empty; a JSON object is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg}") from None
