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
        assert path.startswith("/api/v1/") or path in {"/healthz", "/readyz", "/metrics"}
