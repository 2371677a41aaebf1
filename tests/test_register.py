"""Registration cannot be used to enumerate accounts, flood the hashing or starve logins."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets

import pytest
from aiohttp.test_utils import TestClient

from flashsale.auth import SIGNUP
from flashsale.settings import Settings
from gateway import appkeys
from gateway.app import create_app
from tests.flashkit import GatewayServer

pytestmark = pytest.mark.integration

PASSWORD = "register-pass-1"
PROXIES = (ipaddress.ip_network("127.0.0.0/8"),)


def _ip() -> dict[str, str]:
    return {"X-Forwarded-For": f"203.0.{secrets.randbelow(256)}.{secrets.randbelow(256)}"}


def _new() -> dict[str, str]:
    return {"email": f"r-{secrets.token_hex(6)}@example.com", "password": PASSWORD, "nickname": "R"}


async def test_registrations_are_throttled_per_address(base_settings: Settings) -> None:
    settings = base_settings.with_(register_ip_attempts=3, trusted_proxies=PROXIES)
    async with TestClient(GatewayServer(create_app(settings))) as client:
        here = _ip()
        statuses = []
        for _ in range(5):
            resp = await client.post("/api/v1/auth/register", json=_new(), headers=here)
            statuses.append(resp.status)
        assert statuses == [201, 201, 201, 429, 429]
        body = await resp.json()
        assert body["error"] == "RATE_LIMITED"
        assert 1 <= int(resp.headers["Retry-After"]) <= settings.register_window_s
        # refused before anything was written
        db = client.app[appkeys.DB]
        refused = await db.fetchval("SELECT count(*) FROM users WHERE email = $1", _new()["email"])
        assert refused == 0
        # another address registers
        resp = await client.post("/api/v1/auth/register", json=_new(), headers=_ip())
        assert resp.status == 201


async def test_registrations_cannot_starve_logins(base_settings: Settings) -> None:
    """A burst of registrations fills its own lane of the password hashing (and gets 503
    past it); logins arriving meanwhile have their own share and are all answered."""
    settings = base_settings.with_(
        login_hash_concurrency=2,
        login_hash_queue=4,
        register_hash_concurrency=1,
        register_hash_queue=2,
        register_ip_attempts=1000,
        trusted_proxies=PROXIES,
    )
    async with TestClient(GatewayServer(create_app(settings))) as client:
        account = _new()
        resp = await client.post("/api/v1/auth/register", json=account)
        assert resp.status == 201
        gate = client.app[appkeys.PASSWORD_HASHER]
        burst = [
            asyncio.create_task(client.post("/api/v1/auth/register", json=_new(), headers=_ip()))
            for _ in range(30)
        ]
        # the registrations' lane is full (or the burst already over) before logins come
        for _ in range(500):
            if gate.in_progress(SIGNUP) >= 3 or all(t.done() for t in burst):
                break
            await asyncio.sleep(0.01)
        logins = await asyncio.gather(
            *(
                client.post(
                    "/api/v1/auth/login",
                    json={"login": account["email"], "password": password},
                    headers=_ip(),
                )
                for password in [PASSWORD] * 3 + ["wrong-guess"] * 3
            )
        )
        assert [r.status for r in logins] == [200] * 3 + [401] * 3
        registered = await asyncio.gather(*burst)
        statuses = sorted(r.status for r in registered)
        assert set(statuses) == {201, 503} and statuses.count(201) >= 3, statuses
        busy = next(r for r in registered if r.status == 503)
        assert (await busy.json())["error"] == "RETRY_LATER" and busy.headers["Retry-After"]
