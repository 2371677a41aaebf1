from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

pytestmark = pytest.mark.integration


def _router_routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        out.add((route.method.lower(), str(path)))
    return out


async def test_spec_matches_router(client: TestClient[Any, Any], app: web.Application) -> None:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    spec = await resp.json()
    assert spec["openapi"].startswith("3.")
    in_spec = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    in_router = _router_routes(app)
    assert in_router - in_spec == set(), "routes missing from the spec"
    assert in_spec - in_router == set(), "spec lists routes that do not exist"
    for path in spec["paths"]:
        pages = path == "/dashboard" or path.startswith(("/sale/", "/static/"))  # HTML
        assert path.startswith("/api/v1/") or path in {"/healthz", "/readyz", "/metrics"} or pages


def _op(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = spec["paths"][path][method]
    return op


async def test_spec_states_what_validation_enforces(client: TestClient[Any, Any]) -> None:
    spec = await (await client.get("/api/v1/openapi.json")).json()
    assert spec["openapi"] == "3.1.0"
    login = _op(spec, "post", "/api/v1/auth/login")["requestBody"]["content"]
    body = login["application/json"]["schema"]
    assert body["required"] == ["login", "password"] and body["additionalProperties"] is False
    assert "pattern" in body["properties"]["login"]
    register = _op(spec, "post", "/api/v1/auth/register")["requestBody"]["content"]
    assert len(register["application/json"]["schema"]["anyOf"]) == 2  # email or phone
    (param,) = _op(spec, "get", "/api/v1/products/{id}")["parameters"]
    assert param["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    query = {p["name"]: p["schema"] for p in _op(spec, "get", "/api/v1/products")["parameters"]}
    assert query["limit"]["type"] == "integer" and query["sort"]["enum"]
    order = _op(spec, "post", "/api/v1/orders")["requestBody"]["content"]["application/json"]
    items = order["schema"]["properties"]["items"]["items"]
    assert items["additionalProperties"] is False and "anyOf" in items
    address = order["schema"]["properties"]["shipping_address"]
    assert address["required"] == ["name", "phone"] and len(address["anyOf"]) == 2
    assert len(order["schema"]["anyOf"]) == 2  # shipping_address or address_id


@pytest.mark.unit
def test_validate_and_schema_agree_on_strings() -> None:
    import re

    from flashsale.errors import ValidationFailed
    from gateway.validation import F, json_schema, validate

    spec = F(str, min_len=1, max_len=5)
    pattern = json_schema(spec)["pattern"]
    for value, ok in (("a", True), (" a ", True), ("   ", False), ("a\x00", False)):
        assert (re.search(pattern, value) is not None) is ok
        try:
            validate({"v": value}, {"v": spec})
            accepted = True
        except ValidationFailed:
            accepted = False
        assert accepted is ok, value


async def test_docs_page_is_served_with_its_assets(client: TestClient[Any, Any]) -> None:
    import re

    resp = await client.get("/api/v1/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    policy = resp.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    assert resp.headers["X-Frame-Options"] == "DENY"
    page = await resp.text()
    assert "<script>" not in page  # no inline script: the policy would refuse it
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert "/static/vendor/swagger-ui-bundle.js" in assets and "/static/docs.js" in assets
    for path in [*assets, "/static/vendor/swagger-ui.LICENSE"]:
        assert (await client.get(path)).status == 200, path


async def test_responses_are_typed_where_declared(client: TestClient[Any, Any]) -> None:
    spec = await (await client.get("/api/v1/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    join = _op(spec, "post", "/api/v1/flash-sales/{sale_id}/join")["responses"]["202"]
    data = join["content"]["application/json"]["schema"]["properties"]["data"]
    assert data == {"$ref": "#/components/schemas/JoinAccepted"}
    assert set(schemas["JoinAccepted"]["required"]) == {
        "order_id",
        "status",
        "payment_deadline",
        "replayed",
    }
    active = _op(spec, "get", "/api/v1/flash-sales/active")["responses"]["200"]
    items = active["content"]["application/json"]["schema"]["properties"]["data"]
    assert items == {"type": "array", "items": {"$ref": "#/components/schemas/FlashSale"}}
    # an error is the error envelope
    assert join["content"] and "Error" in str(
        _op(spec, "post", "/api/v1/flash-sales/{sale_id}/join")["responses"]["409"]
    )


# Routes answering the JSON envelope whose data no Answer describes, each with the reason its
# data is free-form. None today: a new entry needs a reason, not a missing Answer.
FREE_FORM: frozenset[tuple[str, str]] = frozenset()


def _structs(t: Any) -> list[type]:
    """The Struct classes a type is made of (through lists, dicts, unions, nesting)."""
    import msgspec
    from msgspec import inspect as mi

    out: list[type] = []

    def walk(info: mi.Type) -> None:
        if isinstance(info, mi.StructType):
            if info.cls in out:
                return
            out.append(info.cls)
            for f in info.fields:
                walk(f.type)
        elif isinstance(info, mi.Metadata):
            walk(info.type)
        elif isinstance(info, mi.UnionType):
            for u in info.types:
                walk(u)
        elif isinstance(info, mi.ListType | mi.DictType):
            walk(info.item_type if isinstance(info, mi.ListType) else info.value_type)

    walk(msgspec.inspect.type_info(t))
    return out


@pytest.mark.unit
def test_every_json_answer_is_typed() -> None:
    """Every route that answers the JSON envelope states its data (an Answer, a list of
    one, a union of tagged ones, or NO_DATA for null): the document describes each success
    response and the fuzz test holds the answers to it."""
    from gateway.routes import extra_routes, health, users
    from gateway.routes.payments import SANDBOX_ROUTES
    from gateway.routing import openapi_spec
    from gateway.shapes import NO_DATA, Answer

    routes = [*health.ROUTES, *users.ROUTES, *extra_routes(), *SANDBOX_ROUTES]
    untyped = {(r.method, r.path) for r in routes if r.envelope and r.answer is None}
    assert untyped == FREE_FORM, "give these routes an answer (gateway/shapes.py Answer)"
    for r in routes:
        if not r.envelope:
            assert r.answer is None, (r.method, r.path, "answers no envelope")
        elif r.answer is not None and r.answer is not NO_DATA:
            structs = _structs(r.answer)
            assert structs, (r.method, r.path, "its data is no Struct")
            assert all(issubclass(c, Answer) for c in structs), (r.method, r.path, structs)
    spec = openapi_spec(routes, version="test")
    generic = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        for status, answer in op["responses"].items()
        if status.startswith("2")
        and "content" in answer
        and answer["content"]["application/json"]["schema"]
        == {"$ref": "#/components/schemas/Envelope"}
    }
    assert generic == FREE_FORM
