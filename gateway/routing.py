"""The route table: every route is declared once with what the OpenAPI spec needs.

Handlers register through :func:`add_routes`, which both adds them to the router
and records them for ``/api/v1/openapi.json``; a test checks that the router and
the spec list exactly the same routes. A route's ``body``, ``query`` and ``params``
are the very types its handler reads (:mod:`gateway.shapes`), so the document states
exactly what is enforced (see :mod:`gateway.validation`).

The router, not the handler, checks the role a route declares in ``auth``: the
handler of a route with ``auth`` takes ``(request, principal)`` and is called only
once the caller's token is verified and its role allowed (401, then 403, before
anything else). ``responses`` names the error classes of the one catalogue
(:mod:`flashsale.errors`) a route answers with beyond those every route of its kind
can give; the document takes their status and code from the classes.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import Any, Final, Literal, cast

from aiohttp import web

from flashsale.auth import Principal, require_role
from flashsale.errors import (
    AppError,
    Forbidden,
    InvalidJSON,
    NotFound,
    PayloadTooLarge,
    TokenExpired,
    TokenInvalid,
    TokenMalformed,
    TokenRevoked,
    Unauthorized,
    ValidationFailed,
)
from gateway.appkeys import TOKENS
from gateway.auth import authenticate, optional_principal
from gateway.shapes import (
    PATH_ID_SPEC,
    Body,
    PathParams,
    Query,
    path_spec_of,
    query_spec_of,
    response_components,
    spec_of,
)
from gateway.validation import F, json_schema, object_schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The handler of a route with ``auth``: the router hands it the verified principal.
SignedInHandler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]
GuestHandler = Callable[[web.Request, Principal | None], Awaitable[web.StreamResponse]]

# "optional": a token is not needed, but one that is sent must be valid (principal or None).
Auth = Literal["user", "merchant", "merchant-only", "admin", "optional"]
# The roles each value lets in; None: any signed-in caller.
ROLES_OF: Final[Mapping[str, tuple[str, ...] | None]] = {
    "user": None,
    "merchant": ("merchant", "admin"),
    "merchant-only": ("merchant",),
    "admin": ("admin",),
}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler | SignedInHandler | GuestHandler
    summary: str
    auth: Auth | None = None
    # A Body subclass (the handler reads it with gateway.shapes.read_body), or a spec its
    # handler validates with gateway.validation.validate.
    body: type[Body] | Mapping[str, F] | None = None
    # The Query subclass its handler reads with gateway.shapes.read_query.
    query: type[Query] | None = None
    # The errors this route answers with beyond those of its kind (see errors_of).
    responses: Sequence[type[AppError]] = ()
    # The success statuses beyond 200, each with what it means.
    success: Mapping[int, str] = field(default_factory=dict)
    # The type of the success envelope's ``data`` (an Answer Struct, a list of one, NO_DATA
    # for null...); None: the generic envelope, for no route answering JSON
    # (tests/test_openapi.py).
    answer: Any = None
    tag: str = "misc"
    # The PathParams subclass its handler reads with gateway.shapes.read_path: the
    # placeholders that are not a numeric id (PathId), e.g. order ids.
    params: type[PathParams] | None = None
    # False where the handler takes a missing body as {} (the fields are all optional).
    body_required: bool = True
    # Rules across fields the schema language cannot state (answered with 422).
    rules: str | None = None
    # False for the few routes that do not answer with the JSON envelope.
    envelope: bool = True

    def __post_init__(self) -> None:
        wanted = 1 if self.auth is None else 2
        if len(inspect.signature(self.handler).parameters) != wanted:
            raise TypeError(
                f"{self.method} {self.path}: the handler of a route with auth={self.auth!r} "
                f"takes {wanted} argument(s)"
            )


def body_spec(r: Route) -> Mapping[str, F] | None:
    """The validation spec of ``r``'s body (derived from its Body type, if it has one)."""
    if isinstance(r.body, type):
        return spec_of(r.body)
    return r.body


def path_spec(r: Route) -> dict[str, F]:
    """The validation spec of each of ``r``'s path parameters: a field of its PathParams
    type, else a numeric id."""
    declared = {} if r.params is None else path_spec_of(r.params)
    return {name: declared.get(name, PATH_ID_SPEC) for name in path_params(r)}


def query_spec(r: Route) -> Mapping[str, F]:
    """The validation spec of ``r``'s query string (derived from its Query type)."""
    return {} if r.query is None else query_spec_of(r.query)


ROUTE_TABLE: web.AppKey[list[Route]] = web.AppKey("route_table", list)


def add_routes(app: web.Application, routes: Sequence[Route]) -> None:
    table = app.setdefault(ROUTE_TABLE, [])
    for r in routes:
        app.router.add_route(r.method, r.path, guarded(r))
        table.append(r)


def guarded(r: Route) -> Handler:
    """The handler aiohttp calls for ``r``: ``r.handler`` behind the role ``r.auth`` declares.

    The guard is a plain function that returns the handler's own coroutine: one call
    more per request, and no second coroutine to await (the join is the hot path).
    """
    if r.auth is None:
        return cast(Handler, r.handler)
    if r.auth == "optional":
        guest = cast(GuestHandler, r.handler)

        def guard(request: web.Request) -> Awaitable[web.StreamResponse]:
            return guest(request, optional_principal(request, request.app[TOKENS]))

        return _coroutine_function(guard, guest)
    handler = cast(SignedInHandler, r.handler)
    roles = ROLES_OF[r.auth]
    if roles is None:

        def guard(request: web.Request) -> Awaitable[web.StreamResponse]:
            return handler(request, authenticate(request, request.app[TOKENS]))

    else:

        def guard(request: web.Request) -> Awaitable[web.StreamResponse]:
            return handler(
                request, require_role(authenticate(request, request.app[TOKENS]), *roles)
            )

    return _coroutine_function(guard, handler)


def _coroutine_function(
    guard: Callable[[web.Request], Awaitable[web.StreamResponse]], handler: Callable[..., Any]
) -> Handler:
    """``guard`` named as ``handler`` and marked as a coroutine function, so that aiohttp
    awaits what it returns instead of wrapping it in a coroutine of its own."""
    update_wrapper(guard, handler)
    if sys.version_info >= (3, 12):
        return inspect.markcoroutinefunction(guard)
    guard._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return guard


def path_params(r: Route) -> list[str]:
    return [seg[1:-1] for seg in r.path.split("/") if seg.startswith("{")]


_ENVELOPE: Final = {
    "type": "object",
    "required": ["code", "message", "data"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
}
_ERROR: Final = {
    "type": "object",
    "required": ["code", "message", "error"],
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "error": {"type": "string"},
        "fields": {"type": "object", "additionalProperties": {"type": "string"}},
        "request_id": {"type": "string"},
    },
}


_BODY_ERRORS: Final = (InvalidJSON, PayloadTooLarge, ValidationFailed)
_TOKEN_ERRORS: Final = (Unauthorized, TokenExpired, TokenMalformed, TokenInvalid, TokenRevoked)


def errors_of(r: Route) -> list[type[AppError]]:
    """The errors ``r`` can answer with: those every route of its kind can give, then its own."""
    out: list[type[AppError]] = []
    if r.body is not None:
        out += _BODY_ERRORS
    if r.query is not None:
        out.append(ValidationFailed)
    if r.auth is not None:
        out += _TOKEN_ERRORS
    if ROLES_OF.get(r.auth or "") is not None:
        out.append(Forbidden)
    if path_params(r):
        out.append(NotFound)
    return [*dict.fromkeys([*out, *r.responses])]


def _error_codes(r: Route) -> dict[int, list[str]]:
    """Each error status ``r`` answers with, and the codes it carries then."""
    codes: dict[int, list[str]] = {}
    for error in errors_of(r):
        names = codes.setdefault(error.http_status, [])
        if error.code not in names:
            names.append(error.code)
    return codes


def _error_schema(codes: list[str]) -> dict[str, Any]:
    """The error envelope whose ``error`` is one of ``codes``."""
    return {
        "allOf": [
            {"$ref": "#/components/schemas/Error"},
            {"type": "object", "properties": {"error": {"type": "string", "enum": codes}}},
        ]
    }


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["code", "message", "data"],
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "data": data,
        },
    }


def _operation(r: Route, answer: dict[str, Any] | None) -> dict[str, Any]:
    errors = _error_codes(r)
    success = {200: "success envelope"} | dict(r.success)
    texts = success | {s: ", ".join(c) for s, c in errors.items()}
    responses: dict[str, Any] = {}
    for code, text in sorted(texts.items()):
        entry: dict[str, Any] = {"description": text}
        if r.envelope:
            if code in errors:
                schema = _error_schema(errors[code])
            elif answer is not None:
                schema = _envelope(answer)
            else:
                schema = {"$ref": "#/components/schemas/Envelope"}
            entry["content"] = {"application/json": {"schema": schema}}
        responses[str(code)] = entry
    op: dict[str, Any] = {
        "summary": r.summary,
        "tags": [r.tag],
        "operationId": (r.method + r.path).replace("/", "_").replace("{", "").replace("}", ""),
        "responses": responses,
    }
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": json_schema(spec, nullable=False),
        }
        for name, spec in path_spec(r).items()
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": spec.required and not spec.has_default,
            **({"description": spec.doc} if spec.doc else {}),
            "schema": json_schema(spec, nullable=False),
        }
        for name, spec in query_spec(r).items()
    ]
    if params:
        op["parameters"] = params
    notes = []
    if r.auth == "optional":
        op["security"] = [{}, {"bearer": []}]
    elif r.auth is not None:
        op["security"] = [{"bearer": []}]
        roles = ROLES_OF[r.auth]
        notes.append(
            "requires a signed-in caller"
            if roles is None
            else "requires role: " + " or ".join(roles)
        )
    if r.rules:
        notes.append("also checked (422): " + r.rules)
    if notes:
        op["description"] = "; ".join(notes)
    body = body_spec(r)
    if body is not None:
        op["requestBody"] = {
            "required": r.body_required,
            "content": {"application/json": {"schema": object_schema(body)}},
        }
    return op


def openapi_spec(routes: Sequence[Route], *, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``routes``."""
    answers = [r.answer for r in routes if r.answer is not None]
    refs, components = response_components(answers)
    schema_of = {id(a): ref for a, ref in zip(answers, refs, strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        answer = schema_of.get(id(r.answer)) if r.answer is not None else None
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, answer)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Flash-sale gateway", "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Envelope": _ENVELOPE, "Error": _ERROR, **components},
        },
        "paths": paths,
    }
