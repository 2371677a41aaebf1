"""Every envelope error class, through the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flashsale.settings import Settings
from gateway.app import create_app
from gateway.http import ok, read_json
from gateway.validation import F, validate
from tests.flashkit import GatewayServer

pytestmark = pytest.mark.integration

SCHEMA = {"quantity": F(int, min=1, max=10), "name": F(str, required=False, max_len=5)}


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals must not leak")


async def echo(request: web.Request) -> web.Response:
    return ok(validate(await read_json(request), SCHEMA))


@pytest.fixture(scope="module")
async def eclient(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(base_settings.with_(max_body_bytes=2048))
    app.router.add_get("/test/boom", boom)
    app.router.add_post("/test/echo", echo)
    async with TestClient(GatewayServer(app)) as c:
        yield c


async def test_success_envelope(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.post("/test/echo", json={"quantity": 2})
    assert resp.status == 200
    body = await resp.json()
    assert body == {"code": 200, "message": "ok", "data": {"quantity": 2}}
    assert resp.headers["X-Request-ID"]


async def test_request_id_echoed(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"


async def test_unknown_route(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.get("/api/v1/nope")
    assert resp.status == 404
    body = await resp.json()
    assert body["code"] == 404 and body["error"] == "NOT_FOUND" and "message" in body


async def test_wrong_method(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.delete("/healthz")
    assert resp.status == 405
    assert (await resp.json())["error"] == "METHOD_NOT_ALLOWED"
    assert "GET" in resp.headers["Allow"]


async def test_malformed_json(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.post(
        "/test/echo", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "INVALID_JSON"


async def test_empty_body(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.post("/test/echo", data=b"")
    assert resp.status == 400
    assert (await resp.json())["error"] == "INVALID_JSON"


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({"quantity": "2"}, {"quantity"}),
        ({"quantity": True}, {"quantity"}),
        ({"quantity": 1.5}, {"quantity"}),
        ({}, {"quantity"}),
        ({"quantity": 1, "extra": 1}, {"extra"}),
        ({"quantity": 0, "name": "toolong"}, {"quantity", "name"}),
        ([1, 2], {"body"}),
    ],
)
async def test_validation(eclient: TestClient[Any, Any], payload: Any, fields: set[str]) -> None:
    resp = await eclient.post("/test/echo", json=payload)
    assert resp.status == 422
    body = await resp.json()
    assert body["error"] == "VALIDATION_FAILED"
    assert set(body["fields"]) == fields


async def test_body_too_large(eclient: TestClient[Any, Any]) -> None:
    resp = await eclient.post(
        "/test/echo",
        data=b'{"quantity": 1, "pad": "' + b"x" * 5000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "PAYLOAD_TOO_LARGE"


async def test_internal_error_hides_details(
    eclient: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    resp = await eclient.get("/test/boom")
    assert resp.status == 500
    body = await resp.json()
    assert body["error"] == "INTERNAL"
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert "secret internals" not in await resp.text()
    assert any("secret internals" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_metrics_exposed(eclient: TestClient[Any, Any]) -> None:
    await eclient.get("/healthz")
    resp = await eclient.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert 'flashsale_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "flashsale_http_request_duration_seconds_bucket" in text
