"""Event streams are bounded: per address, per worker, and in time."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from flashsale.auth import TokenService
from flashsale.settings import Settings
from gateway import appkeys
from gateway.app import create_app
from tests.flashkit import GatewayServer, admin_headers, create_sale, make_sku, sse_events

pytestmark = pytest.mark.integration

PROXIES = (ipaddress.ip_network("127.0.0.0/8"),)


def _from() -> dict[str, str]:
    return {"X-Forwarded-For": f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(256)}"}


async def _first_event(resp: ClientResponse) -> str:
    """The name of the stream's first event (it is open and served)."""
    assert resp.status == 200, await resp.text()
    buf = b""
    while True:
        chunk = await asyncio.wait_for(resp.content.readany(), 20)
        assert chunk, "stream ended"
        events, buf = sse_events(buf + chunk)
        if events:
            return events[0][0]


async def _refused(resp: ClientResponse, status: int, code: str) -> None:
    body = await resp.json()
    assert (resp.status, body["error"]) == (status, code), body
    retry = int(resp.headers["Retry-After"])
    assert retry >= 1 and body["data"] == {"retry_after_s": retry}


@pytest.fixture
async def capped(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    settings = base_settings.with_(
        stream_per_address=2, stream_per_worker=3, trusted_proxies=PROXIES
    )
    async with TestClient(GatewayServer(create_app(settings))) as c:
        yield c


async def test_streams_past_the_caps_are_refused(
    capped: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(capped, admin, await make_sku(db))
    sale_path = f"/api/v1/flash-sales/{sale_id}/events"
    board_path = f"/api/v1/dashboard/sales/{sale_id}/events"
    slots = capped.app[appkeys.STREAMS]
    a, b = _from(), _from()
    async with contextlib.AsyncExitStack() as open_streams:
        for _ in range(2):
            resp = await open_streams.enter_async_context(capped.get(sale_path, headers=a))
            assert await _first_event(resp) == "sale"
        # a third from the same address: 429, on either stream
        await _refused(await capped.get(sale_path, headers=a), 429, "RATE_LIMITED")
        await _refused(await capped.get(board_path, headers=a | admin), 429, "RATE_LIMITED")
        assert (slots.open, slots.of(a["X-Forwarded-For"])) == (2, 2)
        # another address gets the worker's last slot, then the worker is full: 503
        resp = await open_streams.enter_async_context(capped.get(board_path, headers=b | admin))
        assert await _first_event(resp) == "history"
        await _refused(await capped.get(sale_path, headers=_from()), 503, "RETRY_LATER")
        await _refused(await capped.get(board_path, headers=_from() | admin), 503, "RETRY_LATER")
        assert slots.open == 3
    # the streams went away: their slots come back (noticed at the stream's next write)
    for _ in range(400):
        if slots.open == 0:
            break
        await asyncio.sleep(0.05)
    assert slots.open == 0 and slots.of(a["X-Forwarded-For"]) == 0


@pytest.mark.parametrize("kind", ["sale", "dashboard"])
async def test_a_stream_ends_after_its_lifetime(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService, kind: str
) -> None:
    settings = base_settings.with_(stream_max_s=2, stream_per_address=1)
    async with TestClient(GatewayServer(create_app(settings))) as client:
        admin = await admin_headers(db, tokens)
        sale_id = await create_sale(client, admin, await make_sku(db))
        path = (
            f"/api/v1/flash-sales/{sale_id}/events"
            if kind == "sale"
            else f"/api/v1/dashboard/sales/{sale_id}/events"
        )
        for _ in range(2):  # the slot is free again once a stream ends: a second one opens
            async with client.get(path, headers=admin) as resp:
                assert resp.status == 200, await resp.text()
                while await asyncio.wait_for(resp.content.readany(), 20):
                    pass  # until the server ends it
        assert client.app[appkeys.STREAMS].open == 0
