"""The one middleware that maps errors to the envelope, tags requests and records metrics."""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Final, NamedTuple

from aiohttp import web

from flashsale.errors import (
    AppError,
    ReferenceGone,
    ServiceUnavailable,
    envelope,
    for_http_status,
)
from flashsale.stores.db import lost_database, reference_gone
from flashsale.stores.metrics import RequestStats
from flashsale.stores.redisclient import lost_connection
from gateway.http import JSON_CONTENT_TYPE, dumps, printable_ascii
from gateway.routing import Handler

log = logging.getLogger("flashsale.errors")

REQUEST_ID: Final = "X-Request-ID"
MAX_REQUEST_ID: Final = 128
_REQUEST_ID_KEY: Final = web.RequestKey("request_id", str)


def request_id(request: web.Request) -> str:
    rid: str = request.get(_REQUEST_ID_KEY, "")
    return rid


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = info.route if info is not None else None
    if route is None or route.resource is None or getattr(info, "http_exception", None):
        return "unmatched"
    return route.resource.canonical


def error_body(
    status: int,
    code: str,
    message: str,
    rid: str,
    *,
    fields: dict[str, str] | None = None,
    data: object = None,
) -> bytes:
    return dumps(envelope(status, code, message, request_id=rid, fields=fields, data=data))


def _error_response(
    status: int,
    code: str,
    message: str,
    rid: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(status, code, message, rid)
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


class ErrorAnswer(NamedTuple):
    status: int
    body: bytes
    headers: dict[str, str] | None


def answer_error(
    exc: Exception, rid: str, stats: RequestStats, method: str, path: str
) -> ErrorAnswer:
    """The envelope for an error a handler raised (a catalogue error, a lost store as a
    503, anything else as a logged 500); ``web.HTTPException`` is the caller's."""
    if not isinstance(exc, AppError):
        if lost_connection(exc) or lost_database(exc):  # a retriable 503, not a 500
            log.warning("%s %s request_id=%s: a store is out of reach: %r", method, path, rid, exc)
            # ServiceUnavailable carries its Retry-After (1 s: a store that went away
            # is back, or failed over, within seconds)
            exc = ServiceUnavailable("a store connection was lost; retry later")
        elif reference_gone(exc):  # rolled back: the request named what no longer exists
            # logged: the same refusal from a row our own code got wrong would be a bug
            log.warning("%s %s request_id=%s: a referenced row is gone: %r", method, path, rid, exc)
            exc = ReferenceGone()
        else:
            log.error("unhandled error in %s %s request_id=%s", method, path, rid, exc_info=exc)
            body = error_body(
                AppError.http_status,
                AppError.code,
                "internal error; quote the request_id when reporting it",
                rid,
            )
            return ErrorAnswer(AppError.http_status, body, None)
    stats.error(exc.code)
    body = error_body(exc.http_status, exc.code, exc.message, rid, fields=exc.fields, data=exc.data)
    return ErrorAnswer(exc.http_status, body, exc.headers)


_ids = itertools.count(1)
_ID_PREFIX: Final = os.urandom(4).hex() + "-"


def new_request_id(given: str | None) -> str:
    """The client's id when it can be echoed in the reply's header and body and in the
    order event; one that could not be is replaced, never answered with an error."""
    if not given or len(given) > MAX_REQUEST_ID or not printable_ascii(given):
        return f"{_ID_PREFIX}{next(_ids):x}"
    return given


def make_middleware(stats: RequestStats) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = new_request_id(request.headers.get(REQUEST_ID))
        request[_REQUEST_ID_KEY] = rid
        started = time.perf_counter()
        response: web.StreamResponse
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = for_http_status(exc.status).code
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _error_response(exc.status, code, exc.reason, rid, headers=headers)
        except Exception as exc:  # noqa: BLE001 (answer_error logs what is not ours)
            status, body, headers = answer_error(exc, rid, stats, request.method, request.path)
            response = web.Response(
                body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers
            )
        response.headers[REQUEST_ID] = rid
        stats.record(
            request.method, _route_name(request), response.status, time.perf_counter() - started
        )
        return response

    return envelope
