"""Login cannot be used to guess passwords, enumerate accounts or burn the CPU."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from flashsale.settings import Settings
from gateway import appkeys
from gateway.app import create_app
from tests.flashkit import GatewayServer

pytestmark = pytest.mark.integration

PASSWORD = "throttle-pass-1"


@pytest.fixture(scope="module")
async def strict(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """A worker with small limits that believes X-Forwarded-For (one client IP per test)."""
    settings = base_settings.with_(
        login_account_ip_attempts=3,
        login_ip_attempts=6,
        login_account_attempts=8,
        login_window_s=60,
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    async with TestClient(GatewayServer(create_app(settings))) as c:
        yield c


def _ip() -> dict[str, str]:
    return {"X-Forwarded-For": f"198.51.{secrets.randbelow(256)}.{secrets.randbelow(256)}"}


async def _account(client: TestClient[Any, Any]) -> str:
    email = f"t-{secrets.token_hex(5)}@example.com"
    resp = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": PASSWORD, "nickname": "T"}
    )
    assert resp.status == 201
    return email


async def _login(
    client: TestClient[Any, Any], login: str, password: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    resp = await client.post(
        "/api/v1/auth/login", json={"login": login, "password": password}, headers=headers
    )
    return resp.status, await resp.json(), dict(resp.headers)


async def test_an_attacker_elsewhere_cannot_lock_the_owner_out(base_settings: Settings) -> None:
    """12 wrong passwords from address A (default limits): A is throttled at that account,
    and the owner, from address B, still logs in."""
    settings = base_settings.with_(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    async with TestClient(GatewayServer(create_app(settings))) as client:
        email = await _account(client)
        attacker, owner = _ip(), _ip()
        statuses = [(await _login(client, email, "wrong-guess", attacker))[0] for _ in range(12)]
        limit = settings.login_account_ip_attempts
        assert statuses == [401] * limit + [429] * (12 - limit)
        # the right password from A is refused too: A is throttled at this account...
        status, body, headers = await _login(client, email, PASSWORD, attacker)
        assert status == 429 and body["error"] == "RATE_LIMITED"
        assert 1 <= int(headers["Retry-After"]) <= settings.login_window_s
        # ...and the owner elsewhere is not
        status, body, _ = await _login(client, email, PASSWORD, owner)
        assert status == 200 and body["data"]["user"]["email"] == email
        # A stays throttled at this account after the owner's success
        assert (await _login(client, email, PASSWORD, attacker))[0] == 429


async def test_a_spray_from_many_addresses_meets_the_account_limit(
    strict: TestClient[Any, Any],
) -> None:
    """The account-wide limit (8 here) counts only attempts an address's own limits let
    through: a refused one from a throttled address adds nothing to it."""
    email = await _account(strict)
    first = _ip()
    statuses = [(await _login(strict, email, "wrong-guess", first))[0] for _ in range(10)]
    assert statuses == [401] * 3 + [429] * 7  # 7 refusals, none of them counted below
    for _ in range(5):  # 3 + 5 = 8 counted: the account-wide limit
        assert (await _login(strict, email, "wrong-guess", _ip()))[0] == 401
    status, _, headers = await _login(strict, email, PASSWORD, _ip())
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60


async def test_success_clears_the_account_count(strict: TestClient[Any, Any]) -> None:
    email = await _account(strict)
    ip = _ip()
    for _ in range(2):
        assert (await _login(strict, email, "wrong-guess", ip))[0] == 401
    assert (await _login(strict, email, PASSWORD, ip))[0] == 200
    for _ in range(2):
        assert (await _login(strict, email, "wrong-guess", ip))[0] == 401
    assert (await _login(strict, email, PASSWORD, ip))[0] == 200


async def test_client_ip_is_throttled_across_accounts(strict: TestClient[Any, Any]) -> None:
    ip = _ip()
    for _ in range(6):
        status, body, _ = await _login(strict, f"nobody-{secrets.token_hex(4)}@x.io", "pw", ip)
        assert status == 401 and body["error"] == "INVALID_CREDENTIALS"
    status, _, headers = await _login(strict, f"nobody-{secrets.token_hex(4)}@x.io", "pw", ip)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    # another client is not affected
    assert (await _login(strict, f"nobody-{secrets.token_hex(4)}@x.io", "pw", _ip()))[0] == 401


async def test_unknown_account_costs_a_hash(strict: TestClient[Any, Any]) -> None:
    gate = strict.app[appkeys.PASSWORD_HASHER]
    before = gate.completed
    status, _, _ = await _login(strict, f"ghost-{secrets.token_hex(4)}@x.io", "pw", _ip())
    assert status == 401
    assert gate.completed == before + 1


async def test_concurrent_hashes_are_bounded(base_settings: Settings) -> None:
    settings = base_settings.with_(login_hash_concurrency=1, login_hash_queue=1)
    async with TestClient(GatewayServer(create_app(settings))) as c:
        logins = [
            c.post(
                "/api/v1/auth/login",
                json={"login": f"ghost-{secrets.token_hex(4)}@x.io", "password": "pw"},
            )
            for _ in range(8)
        ]
        responses = await asyncio.gather(*logins)
        statuses = sorted(r.status for r in responses)
        busy = [r for r in responses if r.status == 503]
        assert statuses.count(401) >= 2 and busy, statuses
        assert (await busy[0].json())["error"] == "RETRY_LATER"
        assert "Retry-After" in busy[0].headers
