"""The one middleware that maps errors to the envelope, tags requests and records metrics."""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Final

from aiohttp import web

from flashsale.errors import AppError, ServiceUnavailable, envelope, for_http_status
from flashsale.stores.db import lost_database
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


def _error_response(
    status: int,
    code: str,
    message: str,
    rid: str,
    *,
    fields: dict[str, str] | None = None,
    data: object = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = dumps(envelope(status, code, message, request_id=rid, fields=fields, data=data))
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, headers=headers)


def _app_error_response(exc: AppError, rid: str, stats: RequestStats) -> web.Response:
    stats.error(exc.code)
    return _error_response(
        exc.http_status,
        exc.code,
        exc.message,
        rid,
        fields=exc.fields,
        data=exc.data,
        headers=exc.headers,
    )


def make_middleware(stats: RequestStats) -> web.middleware:  # type: ignore[valid-type]
    prefix = os.urandom(4).hex() + "-"
    sequence = itertools.count(1)

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID)
        # a client's id is echoed in the reply's header and body and in the order event:
        # one that could not be is replaced, never answered with an error
        if not rid or len(rid) > MAX_REQUEST_ID or not printable_ascii(rid):
            rid = f"{prefix}{next(sequence):x}"
        request[_REQUEST_ID_KEY] = rid
        started = time.perf_counter()
        try:
            response = await handler(request)
        except AppError as exc:
            response = _app_error_response(exc, rid, stats)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = for_http_status(exc.status).code
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _error_response(exc.status, code, exc.reason, rid, headers=headers)
        except Exception as exc:
            if lost_connection(exc) or lost_database(exc):  # a retriable 503, not a 500
                log.warning(
                    "%s %s request_id=%s: a store is out of reach: %r",
                    request.method,
                    request.path,
                    rid,
                    exc,
                )
                # ServiceUnavailable carries its Retry-After (1 s: a store that went away
                # is back, or failed over, within seconds)
                unavailable = ServiceUnavailable("a store connection was lost; retry later")
                response = _app_error_response(unavailable, rid, stats)
            else:
                log.exception(
                    "unhandled error in %s %s request_id=%s", request.method, request.path, rid
                )
                response = _error_response(
                    AppError.http_status,
                    AppError.code,
                    "internal error; quote the request_id when reporting it",
                    rid,
                )
        response.headers[REQUEST_ID] = rid
        stats.record(
            request.method, _route_name(request), response.status, time.perf_counter() - started
        )
        return response

    return envelope
