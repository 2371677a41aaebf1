"""The route table: every route is declared once with what the OpenAPI spec needs.

Handlers register through :func:`add_routes`, which both adds them to the router
and records them for ``/api/v1/openapi.json``; a test checks that the router and
the spec list exactly the same routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.validation import F

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str | None = None  # None, "user", "merchant", "admin", "optional"
    body: Mapping[str, F] | None = None
    query: Mapping[str, str] = field(default_factory=dict)
    responses: Mapping[int, str] = field(default_factory=dict)
    tag: str = "misc"


ROUTE_TABLE: web.AppKey[list[Route]] = web.AppKey("route_table", list)


def add_routes(app: web.Application, routes: Sequence[Route]) -> None:
    table = app.setdefault(ROUTE_TABLE, [])
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)
        table.append(r)


def _schema_for(spec: F) -> dict[str, Any]:
    mapping: dict[type, dict[str, Any]] = {
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
        bool: {"type": "boolean"},
        list: {"type": "array"},
        dict: {"type": "object"},
        datetime: {"type": "string", "format": "date-time"},
    }
    out = dict(mapping.get(spec.kind, {}))
    if spec.min is not None:
        out["minimum"] = spec.min
    if spec.max is not None:
        out["maximum"] = spec.max
    if spec.min_len is not None:
        out["minLength" if spec.kind is str else "minItems"] = spec.min_len
    if spec.max_len is not None:
        out["maxLength" if spec.kind is str else "maxItems"] = spec.max_len
    if spec.choices is not None:
        out["enum"] = list(spec.choices)
    if spec.kind is list and spec.items is not None:
        out["items"] = mapping.get(spec.items, {})
    if spec.nullable:
        out["nullable"] = True
    return out


def openapi_spec(routes: Sequence[Route], *, version: str) -> dict[str, Any]:
    """An OpenAPI 3.0 document for ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": (r.method + r.path).replace("/", "_").replace("{", "").replace("}", ""),
            "responses": {
                str(code): {"description": text}
                for code, text in ({200: "success envelope"} | dict(r.responses)).items()
            },
        }
        params = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in r.path.split("/")
            if seg.startswith("{")
        ]
        params += [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": desc,
                "schema": {"type": "string"},
            }
            for name, desc in r.query.items()
        ]
        if params:
            op["parameters"] = params
        if r.auth not in (None, "optional"):
            op["security"] = [{"bearer": []}]
            op["description"] = f"requires role: {r.auth}"
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {name: _schema_for(f) for name, f in r.body.items()},
                            "required": [
                                n for n, f in r.body.items() if f.required and not f.has_default
                            ],
                        }
                    }
                },
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Flash-sale gateway", "version": version},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
