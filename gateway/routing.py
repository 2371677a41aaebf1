"""The route table: every route is declared once with what the OpenAPI spec needs.

Handlers register through :func:`add_routes`, which both adds them to the router
and records them for ``/api/v1/openapi.json``; a test checks that the router and
the spec list exactly the same routes. A route's ``body``, ``query`` and ``path``
are the very specs its handler validates with, so the document states exactly
what is enforced (see :mod:`gateway.validation`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from gateway.validation import PATH_ID, F, json_schema, object_schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str | None = None  # None, "user", "merchant", "admin", "optional"
    body: Mapping[str, F] | None = None
    query: Mapping[str, F] = field(default_factory=dict)
    responses: Mapping[int, str] = field(default_factory=dict)
    tag: str = "misc"
    # Path parameters that are not a numeric id (PATH_ID), e.g. order ids.
    params: Mapping[str, F] = field(default_factory=dict)
    # False where the handler takes a missing body as {} (the fields are all optional).
    body_required: bool = True
    # Rules across fields the schema language cannot state (answered with 422).
    rules: str | None = None
    # False for the few routes that do not answer with the JSON envelope.
    envelope: bool = True


ROUTE_TABLE: web.AppKey[list[Route]] = web.AppKey("route_table", list)


def add_routes(app: web.Application, routes: Sequence[Route]) -> None:
    table = app.setdefault(ROUTE_TABLE, [])
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)
        table.append(r)


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


def _responses(r: Route) -> dict[int, str]:
    """The declared responses plus those every route of its kind can give."""
    out: dict[int, str] = {200: "success envelope"}
    if r.body is not None:
        out |= {400: "INVALID_JSON", 413: "PAYLOAD_TOO_LARGE", 422: "VALIDATION_FAILED"}
    if r.query:
        out[422] = "VALIDATION_FAILED"
    if r.auth is not None:
        out[401] = "AUTH_REQUIRED, TOKEN_EXPIRED, TOKEN_MALFORMED, TOKEN_INVALID"
    if r.auth in ("merchant", "admin"):
        out[403] = "FORBIDDEN"
    if path_params(r):
        out[404] = "NOT_FOUND"
    return out | dict(r.responses)


def _operation(r: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code, text in sorted(_responses(r).items()):
        entry: dict[str, Any] = {"description": text}
        if r.envelope:
            schema = {"$ref": "#/components/schemas/" + ("Error" if code >= 400 else "Envelope")}
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
            "schema": json_schema(r.params.get(name, PATH_ID), nullable=False),
        }
        for name in path_params(r)
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": spec.required and not spec.has_default,
            **({"description": spec.doc} if spec.doc else {}),
            "schema": json_schema(spec, nullable=False),
        }
        for name, spec in r.query.items()
    ]
    if params:
        op["parameters"] = params
    notes = []
    if r.auth == "optional":
        op["security"] = [{}, {"bearer": []}]
    elif r.auth is not None:
        op["security"] = [{"bearer": []}]
        notes.append(f"requires role: {r.auth}")
    if r.rules:
        notes.append("also checked (422): " + r.rules)
    if notes:
        op["description"] = "; ".join(notes)
    if r.body is not None:
        op["requestBody"] = {
            "required": r.body_required,
            "content": {"application/json": {"schema": object_schema(r.body)}},
        }
    return op


def openapi_spec(routes: Sequence[Route], *, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Flash-sale gateway", "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Envelope": _ENVELOPE, "Error": _ERROR},
        },
        "paths": paths,
    }
