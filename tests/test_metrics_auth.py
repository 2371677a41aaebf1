"""/metrics is only public when no FLASHSALE_METRICS_TOKEN is set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from flashsale.settings import Settings
from gateway.app import create_app
from tests.flashkit import GatewayServer

pytestmark = pytest.mark.integration

TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture(scope="module")
async def guarded(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(GatewayServer(create_app(base_settings.with_(metrics_token=TOKEN)))) as c:
        yield c


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
async def test_metrics_refused_without_the_token(
    guarded: TestClient[Any, Any], header: str | None
) -> None:
    resp = await guarded.get("/metrics", headers={"Authorization": header} if header else {})
    assert resp.status == 401
    assert (await resp.json())["error"] == "AUTH_REQUIRED"
    assert "flashsale_http_requests_total" not in await resp.text()


async def test_metrics_served_with_the_token(guarded: TestClient[Any, Any]) -> None:
    resp = await guarded.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    assert "flashsale_http_requests_total" in await resp.text()


def test_setting_read_from_env() -> None:
    assert Settings.from_env({"FLASHSALE_METRICS_TOKEN": TOKEN}).metrics_token == TOKEN
    assert Settings.from_env({}).metrics_token is None


async def test_a_consumers_metrics_ask_the_same_token_and_answer_in_the_envelope() -> None:
    """``flashsale consume`` serves its own /metrics and /healthz: the same check as the
    gateway's, the same envelopes."""
    import socket

    import aiohttp

    from consumers.runner import _serve_metrics
    from flashsale.stores.metrics import get_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = Settings(metrics_token=TOKEN, metrics_port=port)
    runner = await _serve_metrics(settings, get_metrics())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics", headers={"Authorization": "Bearer no"}) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
                assert (await r.json())["error"] == "AUTH_REQUIRED"
            async with http.get(
                f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 200
            async with http.get(f"{base}/healthz") as r:
                assert await r.json() == {"code": 200, "message": "ok", "data": {"status": "alive"}}
    finally:
        await runner.cleanup()
