"""The join route served on the connection (``gateway/fastjoin.py``) answers exactly what
the aiohttp route answers, and hands every other request to aiohttp intact.

Two servers of the same app code run side by side: the gateway's own (the join on the
connection) and aiohttp's plain test server (the join through the router and the
middleware). Each case is sent byte for byte to both, and the answers are compared —
status, every header but the date, and the body — after taking out only what differs by
nature (a generated request id, an order id and its deadline).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.settings import Settings
from gateway import fastjoin
from gateway.accesslog import JsonAccessLogger, LineBuffer
from gateway.app import create_app
from gateway.fastjoin import JoinServer
from gateway.plans_runtime import SWITCHES
from gateway.waitingroom_runtime import WAITING_ROOM
from tests.flashkit import (
    GatewayServer,
    admin_headers,
    admitted,
    create_sale,
    enter,
    eventually,
    make_sku,
    make_users,
    queued_sale,
    remaining_of,
)

pytestmark = pytest.mark.integration

BAD = b"\xff\xfe"


def unlimited(settings: Settings) -> Settings:
    """Rate limits far above what a test sends from its one address."""
    return settings.with_(rate_ip_per_s=1e6, rate_ip_burst=1_000_000)


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
    length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    return Answer(int(status_line.split()[1]), headers, body)


async def exchange(client: TestClient[Any, Any], *requests: bytes, split: int = 0) -> list[Answer]:
    """Write ``requests`` on one connection (all at once, or ``split`` bytes at a time)
    and read one answer for each."""
    assert client.host and client.port
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        data = b"".join(requests)
        if split:
            for i in range(0, len(data), split):
                writer.write(data[i : i + split])
                await writer.drain()
                await asyncio.sleep(0.001)
        else:
            writer.write(data)
        await writer.drain()
        return [await _read_answer(reader) for _ in requests]
    finally:
        writer.close()
        await writer.wait_closed()


def request(
    target: str | bytes,
    headers: Mapping[str, str | bytes] | None = None,
    body: bytes | None = b'{"quantity": 1}',
    method: str = "POST",
) -> bytes:
    lines = [
        method.encode()
        + b" "
        + (target if isinstance(target, bytes) else target.encode())
        + b" HTTP/1.1",
        b"Host: localhost",
    ]
    for name, value in (headers or {}).items():
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    if body is not None:
        lines += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    return b"\r\n".join([*lines, b"", b""]) + (body or b"")


def comparable(answer: Answer, *, given_rid: bool) -> tuple[Any, ...]:
    """What must be equal between the two servers."""
    skip = {"date"} | (set() if given_rid else {"x-request-id"})
    headers = sorted((k.lower(), v) for k, v in answer.headers if k.lower() not in skip)
    if answer.header("Content-Type") != "application/json":  # aiohttp's own 400 on a bad head
        return answer.status, headers, answer.body
    body = answer.json()
    if not given_rid:
        body.pop("request_id", None)
    if isinstance(body.get("data"), dict):
        for generated in ("order_id", "payment_deadline"):
            if generated in body["data"]:
                body["data"][generated] = "…"
    if not given_rid:  # the length of a generated id differs; the body is compared instead
        headers = [(k, v) for k, v in headers if k != "content-length"]
    return answer.status, headers, body


@pytest.fixture(scope="module")
async def plain(base_settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The same app served by aiohttp alone."""
    async with TestClient(TestServer(create_app(base_settings))) as c:
        yield c


def join_server(client: TestClient[Any, Any]) -> JoinServer:
    runner = client.server.runner
    assert runner is not None
    server = runner.server
    assert isinstance(server, JoinServer)
    return server


async def test_every_join_answer_is_the_routes_answer(
    client: TestClient[Any, Any],
    plain: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
) -> None:
    admin = await admin_headers(db, tokens)
    sku = await make_sku(db, on_hand=20_000)
    open_sale = await create_sale(client, admin, sku, quantity=10_000, limit=100)
    upcoming = await create_sale(client, admin, sku, quantity=10, start_in_s=3600)
    sold_out = await create_sale(client, admin, sku, quantity=1)
    users = await make_users(db, 3)
    bearer = {"Authorization": f"Bearer {tokens.issue(users[0], 'user')}"}
    buyer = {"Authorization": f"Bearer {tokens.issue(users[1], 'user')}"}
    (first,) = await exchange(client, request(f"/api/v1/flash-sales/{sold_out}/join", buyer))
    assert first.status == 202, first.body
    expired = tokens.issue(users[2], "user", ttl_s=-10)
    join = f"/api/v1/flash-sales/{open_sale}/join"
    cases: list[tuple[str, bytes, bool]] = [
        ("no token", request(join), False),
        ("not a bearer", request(join, {"Authorization": "Basic abc"}), False),
        ("forged token", request(join, {"Authorization": f"Bearer {expired[:-3]}abc"}), False),
        ("expired token", request(join, {"Authorization": f"Bearer {expired}"}), False),
        ("unknown sale", request("/api/v1/flash-sales/987654321/join", bearer), False),
        (
            "sale id too large",
            request("/api/v1/flash-sales/99999999999999999999/join", bearer),
            False,
        ),
        ("not a number", request("/api/v1/flash-sales/abc/join", bearer), False),
        ("not started", request(f"/api/v1/flash-sales/{upcoming}/join", bearer), False),
        ("sold out", request(f"/api/v1/flash-sales/{sold_out}/join", bearer), False),
        ("empty body", request(join, bearer, body=b""), False),
        ("no body", request(join, bearer, body=None), False),
        ("not json", request(join, bearer, body=b"{quantity"), False),
        ("quantity zero", request(join, bearer, body=b'{"quantity": 0}'), False),
        (
            "every bad field",
            request(join, bearer, body=b'{"quantity": "x", "address_id": -1}'),
            False,
        ),
        ("a list", request(join, bearer, body=b"[1]"), False),
        ("bad idempotency key", request(join, {**bearer, "Idempotency-Key": b"k" + BAD}), False),
        ("bad request id", request(join, {**bearer, "X-Request-ID": b"r" + BAD}), False),
        (
            "given request id",
            request(join, {**bearer, "X-Request-ID": "given-1"}, body=b"{}"),
            True,
        ),
        ("a query string", request(join + "?x=1", bearer, body=b"{}"), False),
        ("too large", request(join, bearer, body=b" " * (2 * 1024 * 1024)), False),
        ("bare LF", request(join, bearer).replace(b"\r\n", b"\n"), False),
        (
            "length and chunked",
            request(join, {**bearer, "Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n"),
            False,
        ),
        ("two lengths", request(join, {**bearer, "Content-Length": "15"}), False),
    ]
    for name, raw, given in cases:
        (fast,) = await exchange(client, raw)
        (slow,) = await exchange(plain, raw)
        assert comparable(fast, given_rid=given) == comparable(slow, given_rid=given), name
        assert fast.status != 500, name
    # an accepted join and its keyed replay
    for server in (client, plain):
        key = {**bearer, "Idempotency-Key": f"k-{id(server)}"}
        one, two = await exchange(server, request(join, key), request(join, key))
        assert one.status == two.status == 202, (one.body, two.body)
        assert one.json()["data"]["order_id"] == two.json()["data"]["order_id"]
        assert (one.json()["data"]["replayed"], two.json()["data"]["replayed"]) == (False, True)
        assert one.header("Server") == two.header("Server") is not None
    # the shop read-only: the plan gate refuses a join on both
    for server in (client, plain):
        switches = server.app[SWITCHES]
        switches.read_only = True
        try:
            (refused,) = await exchange(server, request(join, bearer))
        finally:
            switches.read_only = False
        assert refused.status == 503, refused.body
        assert refused.json()["error"] == "READ_ONLY", refused.body


async def test_other_requests_on_the_same_connection_reach_aiohttp(
    client: TestClient[Any, Any],
    plain: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
) -> None:
    admin = await admin_headers(db, tokens)
    sale = await create_sale(client, admin, await make_sku(db), quantity=1_000, limit=100)
    # a shopper of its own for each part: none meets its own rate limit (10 at once)
    bearers = [
        {"Authorization": f"Bearer {tokens.issue(u, 'user')}"} for u in await make_users(db, 8)
    ]
    joins = [request(f"/api/v1/flash-sales/{sale}/join", b) for b in bearers]
    join = joins[0]
    read = request(f"/api/v1/flash-sales/{sale}", body=None, method="GET")
    server = join_server(client)
    served, handed = server.served, server.handed_over
    # pipelined joins, answered in order on the connection
    answers = await exchange(client, join, join, join)
    assert [a.status for a in answers] == [202, 202, 202]
    assert len({a.json()["data"]["order_id"] for a in answers}) == 3
    assert server.served == served + 3 and server.handed_over == handed
    # a join, then a read, then a join, in one write: the read and what follows go to aiohttp
    join = joins[1]
    answers = await exchange(client, join, read, join)
    assert [a.status for a in answers] == [202, 200, 202]
    assert answers[1].json()["data"]["flash_sale_id"] == sale
    assert server.handed_over == handed + 1
    # a read first: the whole connection is aiohttp's
    join = joins[2]
    answers = await exchange(client, read, join)
    assert [a.status for a in answers] == [200, 202]
    # a join written a few bytes at a time, head and body apart
    served = server.served
    join = joins[3]
    answers = await exchange(client, join, join, split=7)
    assert [a.status for a in answers] == [202, 202]
    assert server.served == served + 2
    # refusals answered in place and a reservation between them keep their order; the
    # peer's half-close after its last request still gets every answer, then the end
    upcoming = await create_sale(client, admin, await make_sku(db), quantity=10, start_in_s=600)
    bearer, join = bearers[4], joins[4]
    early = request(f"/api/v1/flash-sales/{upcoming}/join", bearer)
    assert client.host and client.port
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(early + join + early + early)
    writer.write_eof()
    answers = [await _read_answer(reader) for _ in range(4)]
    assert [a.status for a in answers] == [409, 202, 409, 409]
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    # chunked, and Connection: close: aiohttp's, with the same answer
    bearer, join = bearers[5], joins[5]
    chunked = (
        f"POST /api/v1/flash-sales/{sale}/join HTTP/1.1\r\nHost: x\r\n".encode()
        + bearer_line(bearer)
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b'f\r\n{"quantity": 1}\r\n0\r\n\r\n'
    )
    (answer,) = await exchange(client, chunked)
    assert answer.status == 202, answer.body
    join = joins[6]
    closing = join.replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n")
    (answer,) = await exchange(client, closing)
    assert answer.status == 202 and answer.header("Connection") == "close"
    # a request httptools refuses is aiohttp's to answer, as aiohttp answers it
    bad = b"POST /api/v1/flash-sales/1/join HTTP/1.1\r\nBad Header\r\n\r\n"
    (fast,) = await exchange(client, bad)
    (slow,) = await exchange(plain, bad)
    assert fast.status == slow.status == 400 and fast.body == slow.body


def bearer_line(headers: dict[str, str]) -> bytes:
    return f"Authorization: {headers['Authorization']}\r\n".encode()


async def test_an_idle_connection_closes_and_a_silent_one_does_not_block_others(
    base_settings: Settings, db: asyncpg.Pool, tokens: TokenService
) -> None:
    app = create_app(base_settings)
    async with TestClient(GatewayServer(app)) as c:
        join_server(c).keepalive_s = 0.3
        reader, writer = await asyncio.open_connection(c.host, c.port)
        writer.write(b"POST /api/v1/flash-sales/1/jo")  # half a request line, then nothing
        await writer.drain()
        other = await c.get("/healthz")
        assert other.status == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once idle
        writer.close()


async def _answer_or_nothing(reader: asyncio.StreamReader) -> int | None:
    try:
        return (await _read_answer(reader)).status
    except (asyncio.IncompleteReadError, ConnectionError):
        return None  # closed before an answer: the join was not taken (checked below)


async def test_a_stopping_worker_finishes_the_joins_it_took(
    base_settings: Settings, db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    """Joins in flight when the worker stops are answered before their connections close;
    a join the worker never started is not taken. Every unit gone from the sale is a 202."""
    admin = await admin_headers(db, tokens)
    app = create_app(unlimited(base_settings))
    c = TestClient(GatewayServer(app))
    await c.start_server()
    sale = await create_sale(c, admin, await make_sku(db), quantity=1_000, limit=1)
    users = await make_users(db, 200)
    connections = [await asyncio.open_connection(c.host, c.port) for _ in users]
    for (_, writer), uid in zip(connections, users, strict=True):
        headers = {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"}
        writer.write(request(f"/api/v1/flash-sales/{sale}/join", headers))
    stopping = asyncio.create_task(c.close())  # the worker stops with joins in flight
    answers = await asyncio.gather(*(_answer_or_nothing(r) for r, _ in connections))
    await stopping
    for _, writer in connections:
        writer.close()
    assert set(answers) <= {202, None}, answers
    taken = 1_000 - await remaining_of(redis, sale)
    assert taken == answers.count(202), (taken, answers.count(202), answers.count(None))


async def test_a_join_on_the_connection_writes_the_routes_access_line(
    base_settings: Settings,
    db: asyncpg.Pool,
    tokens: TokenService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    written: list[bytes] = []
    monkeypatch.setattr(JsonAccessLogger, "buffer", LineBuffer(written.append))
    logger = logging.getLogger("gateway.access")
    caplog.set_level(logging.INFO, logger=logger.name)
    lines = {}
    for name, server in (("fast", GatewayServer), ("plain", TestServer)):
        test_server = server(create_app(unlimited(base_settings)))
        # as stack/processes.py serves the gateway: the JSON access log on
        await test_server.start_server(access_log_class=JsonAccessLogger, access_log=logger)
        async with TestClient(test_server) as c:
            admin = await admin_headers(db, tokens)
            sale = await create_sale(c, admin, await make_sku(db), quantity=10)
            (uid,) = await make_users(db, 1)
            headers = {"Authorization": f"Bearer {tokens.issue(uid, 'user')}", "X-Request-ID": name}
            (answer,) = await exchange(c, request(f"/api/v1/flash-sales/{sale}/join", headers))
            assert answer.status == 202
            JsonAccessLogger.buffer.flush()
            (line,) = [
                orjson.loads(raw)
                for raw in b"".join(written).splitlines()
                if orjson.loads(raw).get("request_id") == name
            ]
            assert line["order_id"] == answer.json()["data"]["order_id"]
            assert line["path"] == f"/api/v1/flash-sales/{sale}/join"
            lines[name] = line
    fast, plain = lines["fast"], lines["plain"]
    assert set(fast) == set(plain)
    for key in ("level", "logger", "method", "status", "peer"):
        assert fast[key] == plain[key], key


async def test_every_poll_answer_is_the_routes_answer(
    client: TestClient[Any, Any],
    plain: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
) -> None:
    """A waiting room's poll on the connection answers what the route answers: the
    lottery before the start, an admission (with and without the owner's token, hidden
    join path or not), and every refusal; other shapes of the request go to aiohttp."""
    admin = await admin_headers(db, tokens)
    upcoming = await queued_sale(client, db, admin, quantity=10, start_in_s=600)
    started = await queued_sale(client, db, admin, quantity=10)
    hidden = await queued_sale(client, db, admin, quantity=10, hidden_join_path=True)
    owner, other = await make_users(db, 2)
    mine = {"Authorization": f"Bearer {tokens.issue(owner, 'user')}"}
    theirs = {"Authorization": f"Bearer {tokens.issue(other, 'user')}"}
    tickets = {}
    for sale in (upcoming, started, hidden):
        resp = await enter(client, sale, mine)
        assert resp.status == 201, await resp.text()
        tickets[sale] = (await resp.json())["data"]["ticket"]
    for sale in (started, hidden):
        await admitted(plain, sale, tickets[sale], mine)
    expired = tokens.issue(other, "user", ttl_s=-10)
    lottery = f"/api/v1/flash-sales/{upcoming}/queue?ticket={tickets[upcoming]}"
    forged = tickets[started][:-2] + ("AA" if not tickets[started].endswith("AA") else "BB")

    def get(target: str, headers: Mapping[str, str | bytes] | None = None) -> bytes:
        return request(target, headers, body=None, method="GET")

    def at(sale: int, ticket: str) -> str:
        return f"/api/v1/flash-sales/{sale}/queue?ticket={ticket}"

    cases: list[tuple[str, bytes, bool]] = [
        ("lottery, no token", get(lottery), False),
        ("lottery, its owner", get(lottery, mine), False),
        ("admitted, no token", get(at(started, tickets[started])), False),
        ("admitted, its owner", get(at(started, tickets[started]), mine), False),
        ("admitted, another account", get(at(started, tickets[started]), theirs), False),
        ("hidden path, its owner", get(at(hidden, tickets[hidden]), mine), False),
        ("hidden path, another account", get(at(hidden, tickets[hidden]), theirs), False),
        ("forged ticket", get(at(started, forged)), False),
        ("another sale's ticket", get(at(hidden, tickets[started])), False),
        ("unknown sale", get(at(987654321, tickets[started])), False),
        ("sale id too large", get(at(10**20, tickets[started])), False),
        ("not a number", get(f"/api/v1/flash-sales/abc/queue?ticket={tickets[started]}"), False),
        ("expired token", get(lottery, {"Authorization": f"Bearer {expired}"}), False),
        ("not a bearer", get(lottery, {"Authorization": "Basic abc"}), False),
        ("no ticket", get(f"/api/v1/flash-sales/{upcoming}/queue"), False),
        ("empty ticket", get(f"/api/v1/flash-sales/{upcoming}/queue?ticket="), False),
        ("another parameter", get(lottery + "&x=1"), False),
        ("percent-encoded", get(lottery.replace(".", "%2E", 1)), False),
        ("a body", request(lottery, method="GET"), False),
        ("given request id", get(lottery, {"X-Request-ID": "given-poll"}), True),
        ("bad request id", get(lottery, {"X-Request-ID": b"r" + BAD}), False),
    ]
    for name, raw, given in cases:
        for each in (client, plain):  # the same copy of each queue in both workers
            await each.app[WAITING_ROOM].refresh()
        (fast,) = await exchange(client, raw)
        (slow,) = await exchange(plain, raw)
        assert comparable(fast, given_rid=given) == comparable(slow, given_rid=given), name
        assert fast.status != 500, name
    # the plain shape is answered on the connection; the others went to aiohttp
    fast_server = join_server(client)
    served, handed = fast_server.served, fast_server.handed_over
    answers = await exchange(client, get(lottery), get(lottery, mine), get(lottery + "&x=1"))
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[1].json()["data"]["state"] == "lottery"
    assert (fast_server.served, fast_server.handed_over) == (served + 2, handed + 1)
    # a revoked token polls no more, on the connection as through the route
    resp = await client.post("/api/v1/auth/logout", headers=theirs)
    assert resp.status == 200, await resp.text()
    revoked = get(at(started, tickets[started]), theirs)

    async def refused_by_both() -> bool:
        fast_, slow_ = [(await exchange(s, revoked))[0] for s in (client, plain)]
        return fast_.status == slow_.status == 401

    await eventually(refused_by_both, timeout_s=10)
    (fast,) = await exchange(client, revoked)
    (slow,) = await exchange(plain, revoked)
    assert comparable(fast, given_rid=False) == comparable(slow, given_rid=False)
    assert fast.json()["error"] == "TOKEN_REVOKED", fast.body


async def test_a_crowd_leaves_the_loop_a_turn_for_its_tasks(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker answers at most MAX_BURST requests in one I/O phase of its loop; the rest
    wait for the next turn, so tasks and timers (the revocation list's refresh, every
    reservation) run in between however many connections are busy. Counted in turns of the
    loop, not in time: a callback queued with the crowd's requests runs once the first
    I/O phase is over and sees what it answered."""
    monkeypatch.setattr(fastjoin, "MAX_BURST", 16)
    admin = await admin_headers(db, tokens)
    upcoming = await create_sale(client, admin, await make_sku(db), quantity=10, start_in_s=600)
    (user,) = await make_users(db, 1)
    early = request(
        f"/api/v1/flash-sales/{upcoming}/join",
        {"Authorization": f"Bearer {tokens.issue(user, 'user')}"},
    )
    server = join_server(client)
    joins = len(server.joins)
    assert client.host and client.port
    crowd = [await asyncio.open_connection(client.host, client.port) for _ in range(100)]
    try:

        async def accepted() -> bool:
            return len(server.joins) >= joins + len(crowd)

        await eventually(accepted, timeout_s=30)
        served = server.served
        seen: list[int] = []
        for _, writer in crowd:
            writer.write(early)  # into the kernel at once: every socket ready together
        asyncio.get_running_loop().call_soon(lambda: seen.append(server.served - served))
        answers = [await _read_answer(reader) for reader, _ in crowd]
    finally:
        for _, writer in crowd:
            writer.close()
    assert {a.status for a in answers} == {409}
    assert seen and seen[0] <= 16, seen  # one turn answered its share, not the whole crowd
    assert server.served - served == len(crowd)
