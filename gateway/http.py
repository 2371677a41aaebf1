"""Response envelope and request-body helpers shared by every handler."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flashsale.errors import InvalidJSON, PayloadTooLarge

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
    body = dumps({"code": status, "message": message, "data": data})
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def error_body(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    fields: dict[str, str] | None = None,
    data: Any = None,
) -> bytes:
    payload: dict[str, Any] = {"code": status, "message": message, "error": code, "data": data}
    if fields:
        payload["fields"] = fields
    if request_id is not None:
        payload["request_id"] = request_id
    return dumps(payload)


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body: 400 INVALID_JSON if it does not parse, 413 if too large."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge from None
    if not raw:
        raise InvalidJSON("request body is empty; a JSON object is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc.msg}") from None
