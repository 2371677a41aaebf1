"""Bytes that are not UTF-8 in the headers and queries the service reads: a 4xx in the
envelope (or, for a request id, a fresh one), never a 500, and a join reserves nothing
before it has checked them.

aiohttp decodes header values and the request target as UTF-8 with ``surrogateescape``
(``aiohttp/_http_parser.pyx``), so such a byte reaches a handler as a lone surrogate that
no encoder accepts. An HTTP client library would refuse to send one, so these tests write
the request's bytes on a socket to the running app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from gateway.app import create_app
from tests.conftest import auth, make_user
from tests.flashkit import (
    GatewayServer,
    admin_headers,
    admitted,
    count_orders,
    create_sale,
    enter,
    make_sku,
    make_users,
    queued_sale,
)

pytestmark = pytest.mark.integration

BAD = b"\xff\xfe"  # never UTF-8
METRICS_TOKEN = "metrics-token-0123456789abcdef"


class Raw:
    """One HTTP/1.1 exchange written byte for byte on a fresh connection."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw(
    client: TestClient[Any, Any],
    method: str,
    target: bytes,
    headers: Mapping[str, str | bytes] | None = None,
    body: bytes = b"",
) -> Raw:
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: localhost"]
    for name, value in (headers or {}).items():
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    if body:
        lines.append(b"Content-Type: application/json")
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close", b"", b""]
    assert client.host and client.port
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"\r\n".join(lines) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1."), answer[:200]
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Raw(int(status_line.split()[1]), parsed, payload)


def envelope_4xx(resp: Raw, status: int | None = None) -> dict[str, Any]:
    """The reply is the error envelope with a 4xx (``status`` when given)."""
    assert 400 <= resp.status < 500, (resp.status, resp.body[:300])
    if status is not None:
        assert resp.status == status, (resp.status, resp.body[:300])
    body: dict[str, Any] = resp.json()
    assert body["code"] == resp.status and body["error"], body
    return body


@pytest.fixture
async def admin(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return await admin_headers(db, tokens)


@pytest.fixture(scope="module")
async def guarded(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(base_settings.with_(metrics_token=METRICS_TOKEN))
    async with TestClient(GatewayServer(app)) as c:
        yield c


@pytest.mark.parametrize("rid", [b"id-" + BAD, "café".encode(), b"a\tb", b"x" * 129])
async def test_an_invalid_request_id_is_replaced_on_every_reply(
    client: TestClient[Any, Any], rid: bytes
) -> None:
    ok = await raw(client, "GET", b"/api/v1/flash-sales/active", {"X-Request-ID": rid})
    assert ok.status == 200, ok.body[:300]
    fresh = ok.headers["x-request-id"]
    assert fresh and fresh.isascii() and fresh.encode() != rid
    refused = await raw(client, "GET", b"/api/v1/flash-sales/987654321", {"X-Request-ID": rid})
    body = envelope_4xx(refused, 404)
    assert body["request_id"] == refused.headers["x-request-id"] != fresh
    # a good one is kept as it is
    good = await raw(client, "GET", b"/api/v1/flash-sales/active", {"X-Request-ID": "abc-123"})
    assert good.headers["x-request-id"] == "abc-123"


async def test_a_join_with_a_bad_request_id_answers_its_final_word(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=100)
    (uid,) = await make_users(db, 1)
    resp = await raw(
        client,
        "POST",
        f"/api/v1/flash-sales/{sale_id}/join".encode(),
        {**auth(tokens, uid), "X-Request-ID": b"r-" + BAD},
        b'{"quantity": 1}',
    )
    assert resp.status == 202, resp.body[:300]
    order_id = resp.json()["data"]["order_id"]
    assert resp.headers["x-request-id"].isascii()
    # the event was published: the order is in the reservation log, not released
    assert await redis.hexists(rediskeys.log(sale_id), order_id) or await redis.hexists(
        rediskeys.claimed(sale_id), order_id
    )


async def _nothing_reserved(db: asyncpg.Pool, redis: Redis, sale_id: int, stock: int) -> None:
    sale = rediskeys.sale(sale_id)
    assert int(await redis.hget(sale, "remaining") or -1) == stock
    assert await redis.hlen(rediskeys.log(sale_id)) == 0
    assert await redis.hlen(rediskeys.claimed(sale_id)) == 0
    assert await redis.hlen(rediskeys.users(sale_id)) == 0
    assert await count_orders(db, sale_id) == 0


@pytest.mark.parametrize("key", [b"k-" + BAD, "clé".encode(), b"a\tb", b"k" * 65])
async def test_a_join_with_a_bad_idempotency_key_reserves_nothing(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    key: bytes,
) -> None:
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=100)
    (uid,) = await make_users(db, 1)
    path = f"/api/v1/flash-sales/{sale_id}/join".encode()
    resp = await raw(
        client, "POST", path, {**auth(tokens, uid), "Idempotency-Key": key}, b'{"quantity": 1}'
    )
    body = envelope_4xx(resp, 422)
    assert "Idempotency-Key" in body["fields"]
    await _nothing_reserved(db, redis, sale_id, 100)


async def test_idempotency_keys_of_orders_and_checkout(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    before = await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", uid)
    for path in (b"/api/v1/orders", b"/api/v1/cart/checkout"):
        resp = await raw(
            client,
            "POST",
            path,
            {**auth(tokens, uid), "Idempotency-Key": b"k-" + BAD},
            b'{"items": [{"sku_id": 1, "quantity": 1}], "address_id": 1}'
            if path == b"/api/v1/orders"
            else b"{}",
        )
        body = envelope_4xx(resp)
        assert resp.status == 422 and "Idempotency-Key" in body["fields"], body
    assert await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", uid) == before


async def test_cart_tokens_and_bearers_with_bad_bytes(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    # a guest cart token that is not one of ours is no token (a fresh cart), never a 500
    resp = await raw(client, "GET", b"/api/v1/cart", {"X-Cart-Token": b"t-" + BAD})
    assert resp.status == 200, resp.body[:300]
    resp = await raw(
        client,
        "POST",
        b"/api/v1/auth/login",
        {"X-Cart-Token": b"t-" + BAD},
        b'{"login": "nobody@test.local", "password": "wrong-password"}',
    )
    envelope_4xx(resp, 401)
    uid = await make_user(db)
    for token in (b"t-" + BAD, b"t" * 30 + BAD, b"t" * 19 + "é".encode()):
        resp = await raw(
            client, "POST", b"/api/v1/cart/merge", {**auth(tokens, uid), "X-Cart-Token": token}
        )
        assert resp.status == 200 and resp.json()["data"] == {"merged_items": 0}, resp.body
    resp = await raw(client, "GET", b"/api/v1/orders", {"Authorization": b"Bearer a" + BAD})
    envelope_4xx(resp, 401)


async def test_metrics_bearer_with_bad_bytes(guarded: TestClient[Any, Any]) -> None:
    for value in (b"Bearer " + BAD, b"Bearer " + METRICS_TOKEN.encode() + BAD, BAD):
        resp = await raw(guarded, "GET", b"/metrics", {"Authorization": value})
        envelope_4xx(resp, 401)
    resp = await raw(guarded, "GET", b"/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status == 200


async def test_waiting_room_values_with_bad_bytes(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await queued_sale(client, db, admin, quantity=10, max_entrants_per_device=1)
    a, b = await make_users(db, 2)
    base = f"/api/v1/flash-sales/{sale_id}".encode()
    # X-Device-Id on enter
    for device in (b"d-" + BAD, "appareil-é".encode(), b"x" * 129):
        resp = await raw(
            client, "POST", base + b"/enter", {**auth(tokens, a), "X-Device-Id": device}
        )
        body = envelope_4xx(resp, 422)
        assert "X-Device-Id" in body["fields"]
    assert await redis.hlen(rediskeys.queue_entrants(sale_id)) == 0
    # a ticket with a character that is not ASCII, on the poll and on the stream
    for ticket in (b"1.2.F1.3.%C3%A9", b"1.2.F1.3.m%FF%FE", b"%FF", b"%B2.1.F1.3.x"):
        for tail in (b"/queue?ticket=", b"/events?ticket="):
            resp = await raw(client, "GET", base + tail + ticket)
            assert envelope_4xx(resp, 403)["error"] == "TICKET_INVALID"
        # sent raw, aiohttp's parser refuses the request line before the app sees it
        resp = await raw(client, "GET", base + b"/queue?ticket=" + ticket.replace(b"%FF", BAD))
        assert resp.status in (400, 403), resp.body[:300]
    # the admission: in the header, in the path, percent-encoded or raw
    resp = await enter(client, sale_id, {**auth(tokens, a), "X-Device-Id": "dev-a"})
    assert resp.status == 201
    await admitted(client, sale_id, (await resp.json())["data"]["ticket"])
    stock = int(await redis.hget(rediskeys.sale(sale_id), "remaining") or -1)
    for headers, target in (
        ({"X-Join-Token": b"9999999999999.m" + BAD}, base + b"/join"),
        ({"X-Join-Token": "9999999999999.é".encode()}, base + b"/join"),
        ({"X-Join-Token": "²".encode()}, base + b"/join"),
        ({}, base + b"/join/9999999999999.%FF%FE"),
        ({}, base + b"/join/9999999999999.%C3%A9"),
        ({}, base + b"/join/%B2.x"),
        ({}, base + b"/join/%C2%B2.x"),
    ):
        for who in (a, b):
            resp = await raw(
                client, "POST", target, {**auth(tokens, who), **headers}, b'{"quantity": 1}'
            )
            assert resp.status in (403, 404), (target, resp.status, resp.body[:300])
            envelope_4xx(resp)
    assert int(await redis.hget(rediskeys.sale(sale_id), "remaining") or -1) == stock
    assert await redis.hlen(rediskeys.users(sale_id)) == 0


async def test_bad_bytes_in_queries_and_paths(
    client: TestClient[Any, Any], db: asyncpg.Pool, tokens: TokenService
) -> None:
    shopper = auth(tokens, await make_user(db))
    for target, headers in (
        (b"/api/v1/products?q=%FF%FE", {}),
        (b"/api/v1/products?category=%FF", {}),
        (b"/api/v1/products?page=%C2%B2", {}),
        (b"/api/v1/orders?status=%FF", shopper),
        (b"/api/v1/orders/%FF", shopper),
        (b"/api/v1/orders/%FF/logs", shopper),
        (b"/api/v1/flash-sales/%FF", {}),
        (b"/api/v1/flash-sales/1/queue?ticket=%FF", {}),
        (b"/api/v1/payment/sandbox/%FF", shopper),
        (b"/api/v1/presales/%FF", {}),
        (b"/api/v1/preorder/%FF", shopper),
        (b"/api/v1/preorder?from=%FF", shopper),
    ):
        resp = await raw(client, "GET", target, headers)
        assert resp.status < 500, (target, resp.status, resp.body[:300])
        if resp.status >= 400:
            envelope_4xx(resp)
        # the same bytes raw: aiohttp's parser answers 400 before the app sees the request
        raw_target = target.replace(b"%FF", BAD)
        if raw_target != target:
            assert (await raw(client, "GET", raw_target, headers)).status == 400


async def test_a_forwarded_address_with_bad_bytes(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    import ipaddress

    settings = base_settings.with_(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    app: web.Application = create_app(settings)
    async with TestClient(GatewayServer(app)) as c:
        admin = await admin_headers(db, tokens)
        sale_id = await create_sale(c, admin, await make_sku(db), quantity=10)
        (uid,) = await make_users(db, 1)
        resp = await raw(
            c,
            "POST",
            f"/api/v1/flash-sales/{sale_id}/join".encode(),
            {**auth(tokens, uid), "X-Forwarded-For": b"1.2.3.4" + BAD},
            b'{"quantity": 1}',
        )
        assert resp.status == 202, resp.body[:300]
