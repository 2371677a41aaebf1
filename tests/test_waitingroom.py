"""The waiting room of queued sales on the real servers: admission gates the join, the
lottery is fair, admissions follow the stock, sold-out reaches everyone, bots are refused."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from flashsale.auth import TokenService
from flashsale.errors import AppError
from flashsale.flash.cache import SaleState, now_ms
from flashsale.stores import rediskeys
from flashsale.waitingroom.room import Entry, WaitingRoom
from flashsale.waitingroom.signing import solve
from gateway import appkeys
from gateway.flash_runtime import FLASH
from gateway.routes.waitingroom import with_join_path
from gateway.waitingroom_runtime import WAITING_ROOM
from tests.conftest import auth
from tests.flashkit import (
    admin_headers,
    admitted,
    count_orders,
    enter,
    eventually,
    make_sku,
    make_users,
    poll,
    queued_sale,
    sse_events,
)

pytestmark = pytest.mark.integration

SQL_LAST_ORDER_MS = """
SELECT extract(epoch FROM max(created_at)) * 1000 FROM orders WHERE flash_sale_id = $1
"""


@pytest.fixture
async def admin(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return await admin_headers(db, tokens)


async def sale_of(app: web.Application, sale_id: int) -> SaleState:
    sale = await app[FLASH].cache.get(sale_id)
    assert sale is not None
    return sale


@pytest.mark.both_topologies
async def test_join_on_a_queued_sale_needs_an_admission(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await queued_sale(client, db, admin, quantity=10)
    a, b, c = await make_users(db, 3)
    join = {"quantity": 1}
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join", headers=auth(tokens, a), json=join
    )
    assert resp.status == 403 and (await resp.json())["error"] == "NOT_ADMITTED"

    first = await enter(client, sale_id, auth(tokens, a))
    assert first.status == 201, await first.text()
    ticket = (await first.json())["data"]["ticket"]
    again = await enter(client, sale_id, auth(tokens, a))
    assert again.status == 200 and (await again.json())["data"]["ticket"] == ticket
    assert (await again.json())["data"]["replayed"] is True

    view = await admitted(client, sale_id, ticket)
    token = view["join_token"]
    assert view["join_path"] == f"/api/v1/flash-sales/{sale_id}/join/{token}"
    # bound to the user: another shopper cannot use it, in the path or the header
    resp = await client.post(view["join_path"], headers=auth(tokens, b), json=join)
    assert resp.status == 403 and (await resp.json())["error"] == "NOT_ADMITTED"
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join",
        headers={**auth(tokens, b), "X-Join-Token": token},
        json=join,
    )
    assert resp.status == 403
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join/{forged}", headers=auth(tokens, a), json=join
    )
    assert resp.status == 403
    # expired: a genuine token whose window has passed
    room = app[WAITING_ROOM]
    old = room.signer.join_token(sale_id, a, now_ms() - 1)
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join/{old}", headers=auth(tokens, a), json=join
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ADMISSION_EXPIRED"
    resp = await client.post(view["join_path"], headers=auth(tokens, a), json=join)
    assert resp.status == 202, await resp.text()
    text = app[appkeys.METRICS].render()[0].decode()
    for name in ("entered", "admitted", "joined"):
        assert f"flashsale_queue_{name}_total" in text
    assert f'flashsale_queue_length{{sale_id="{sale_id}"}}' in text

    # the hidden join path: with it on, only the URL segment admits, never the header
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}",
        headers=admin,
        json={"queue": {"hidden_join_path": True}},  # the sale's other keys stay
    )
    assert resp.status == 200, await resp.text()
    stored = await db.fetchval("SELECT queue_settings FROM flash_sales WHERE id = $1", sale_id)
    assert stored == {"admit_per_s": 1000, "overbook": 1.0, "hidden_join_path": True}
    await app[FLASH].cache.refresh()
    tc = (await (await enter(client, sale_id, auth(tokens, c))).json())["data"]["ticket"]
    # the admission goes to the ticket's own account only: not to an anonymous poll, not
    # to another account's, not on the stream (which knows no account)
    anonymous = await admitted(client, sale_id, tc)
    assert "join_token" not in anonymous and "join_path" not in anonymous
    assert anonymous["join_expires_at"]
    assert "join_token" not in await poll(client, sale_id, tc, auth(tokens, b))
    async with client.get(f"/api/v1/flash-sales/{sale_id}/events", params={"ticket": tc}) as stream:
        frames: list[tuple[str, Any]] = []
        buf = b""
        while not any(name == "queue" for name, _ in frames):
            buf += await asyncio.wait_for(stream.content.readany(), 10)
            more, buf = sse_events(buf)
            frames += more
    queue_frame = next(data for name, data in frames if name == "queue")
    assert queue_frame["state"] == "admitted" and "join_token" not in queue_frame
    view = await poll(client, sale_id, tc, auth(tokens, c))
    assert view["state"] == "admitted" and view["join_path"].endswith(view["join_token"])
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join",
        headers={**auth(tokens, c), "X-Join-Token": view["join_token"]},
        json=join,
    )
    assert resp.status == 403
    resp = await client.post(view["join_path"], headers=auth(tokens, c), json=join)
    assert resp.status == 202, await resp.text()


async def test_open_sales_have_no_queue(
    client: TestClient[Any, Any], db: asyncpg.Pool, admin: dict[str, str], tokens: TokenService
) -> None:
    from tests.flashkit import create_sale

    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5)
    (user,) = await make_users(db, 1)
    resp = await enter(client, sale_id, auth(tokens, user))
    assert resp.status == 409 and (await resp.json())["error"] == "SALE_NOT_QUEUED"
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join", headers=auth(tokens, user), json={"quantity": 1}
    )
    assert resp.status == 202


async def enter_all(
    room: WaitingRoom,
    sale: SaleState,
    users: list[int],
    db: asyncpg.Pool,
    *,
    ip: str = "10.0.0.1",
    concurrency: int = 100,
) -> list[Entry]:
    """Enter in arrival order ``users`` (batches of ``concurrency`` run together)."""
    out: list[Entry] = []
    for i in range(0, len(users), concurrency):
        out += await asyncio.gather(
            *(
                room.enter(
                    sale, u, client_ip=ip, device_id="", challenge=None, solution=None, db=db
                )
                for u in users[i : i + concurrency]
            )
        )
    return out


@pytest.mark.both_topologies
async def test_admissions_never_exceed_remaining_times_factor(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await queued_sale(client, db, admin, quantity=10, overbook=1.5, join_window_s=5)
    room = app[WAITING_ROOM]
    users = await make_users(db, 40)
    entries = await enter_all(room, await sale_of(app, sale_id), users, db, concurrency=1)
    assert [e.entry.position for e in entries] == list(range(1, 41))  # after the start: FCFS

    async def through() -> int:
        return int(await redis.hget(rediskeys.queue(sale_id), "admitted") or 0)

    await eventually(lambda: _eq(through(), 15))
    await asyncio.sleep(1.0)  # several admitter steps later: still floor(10 x 1.5)
    assert await through() == 15
    assert await redis.zcard(rediskeys.queue_outstanding(sale_id)) == 15

    # five of the admitted join: 5 units left, 10 admissions outstanding >= floor(5 x 1.5)
    for e in entries[:5]:
        await app[WAITING_ROOM].refresh()
        sale = await sale_of(app, sale_id)
        view = with_join_path(room.status(sale, e.entry, now_ms(), viewer=e.entry.user_id))
        resp = await client.post(
            view["join_path"], headers=auth(tokens, e.entry.user_id), json={"quantity": 1}
        )
        assert resp.status == 202, await resp.text()
    await eventually(
        lambda: _eq(redis.zcard(rediskeys.queue_outstanding(sale_id)), 10), timeout_s=5
    )
    assert await through() == 15
    # the ten who never joined are abandoned when their window ends; 7 = floor(5 x 1.5) next
    await eventually(lambda: _eq(through(), 22), timeout_s=20)
    await asyncio.sleep(1.0)
    assert await through() == 22
    assert int(await redis.hget(rediskeys.queue(sale_id), "abandoned") or 0) == 10


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _eq(value: Any, expected: int) -> bool:
    return bool(await value == expected)


@pytest.mark.both_topologies
async def test_sold_out_reaches_the_queue_and_returned_units_go_to_the_next_in_line(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    sale_id = await queued_sale(client, db, admin, quantity=3)
    room = app[WAITING_ROOM]
    users = await make_users(db, 8)
    entries = await enter_all(room, await sale_of(app, sale_id), users, db, concurrency=1)
    waiting = entries[5]

    stream = await client.get(
        f"/api/v1/flash-sales/{sale_id}/events", params={"ticket": waiting.ticket}
    )
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    states: list[str] = []
    pages: list[dict[str, Any]] = []

    async def read_stream() -> None:
        import orjson

        event = ""
        async for raw in stream.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "sale":
                pages.append(orjson.loads(line[6:]))
            elif line.startswith("data: ") and event == "queue":
                states.append(orjson.loads(line[6:])["state"])
                if states[-1] == "sold_out":
                    return

    reader = asyncio.create_task(read_stream())
    for e in entries[:3]:
        view = await admitted(client, sale_id, e.ticket)
        resp = await client.post(
            view["join_path"], headers=auth(tokens, e.entry.user_id), json={"quantity": 1}
        )
        assert resp.status == 202, await resp.text()
    sold_at = time.monotonic()
    await asyncio.wait_for(reader, 10)  # pushed at the worker's next refresh (queue_tick_ms)
    print(f"sold_out on the event stream {time.monotonic() - sold_at:.3f}s after the last unit")
    assert (await poll(client, sale_id, waiting.ticket))["state"] == "sold_out"
    assert states[0] == "waiting" and states[-1] == "sold_out"
    assert pages[-1]["mode"] == "queued" and pages[-1]["queue"]["entrants"] == 8
    stream.close()
    resp = await enter(client, sale_id, auth(tokens, (await make_users(db, 1))[0]))
    assert resp.status == 409 and (await resp.json())["error"] == "SOLD_OUT"  # the queue closed
    through = int(await redis.hget(rediskeys.queue(sale_id), "admitted") or 0)
    assert through == 3

    # two units come back (a top-up): the next two in line are admitted, nobody else
    resp = await client.patch(
        f"/api/v1/admin/flash-sales/{sale_id}", headers=admin, json={"add_quantity": 2}
    )
    assert resp.status == 200
    await admitted(client, sale_id, entries[3].ticket)
    await admitted(client, sale_id, entries[4].ticket)
    await asyncio.sleep(1.0)
    assert (await poll(client, sale_id, entries[5].ticket))["state"] == "waiting"
    assert int(await redis.hget(rediskeys.queue(sale_id), "admitted") or 0) == 5


def spearman(xs: list[int], ys: list[int]) -> float:
    n = len(xs)
    rank_x = {v: i for i, v in enumerate(sorted(xs))}
    rank_y = {v: i for i, v in enumerate(sorted(ys))}
    d2 = sum((rank_x[x] - rank_y[y]) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


async def test_the_lottery_is_not_arrival_order_and_later_arrivals_are(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    admin: dict[str, str],
) -> None:
    sale_id = await queued_sale(client, db, admin, quantity=5, start_in_s=6, admit_per_s=1)
    room = app[WAITING_ROOM]
    sale = await sale_of(app, sale_id)
    early = await enter_all(room, sale, await make_users(db, 1000), db, concurrency=50)
    assert {e.entry.kind for e in early} == {"L"}
    assert all(
        room.status(sale, e.entry, now_ms(), viewer=e.entry.user_id)["state"] == "lottery"
        for e in early[:5]
    )
    await asyncio.sleep(max(0.0, (sale.start_ms - now_ms()) / 1000) + 0.1)
    late = await enter_all(room, sale, await make_users(db, 50), db, concurrency=1)
    assert [e.entry.position for e in late] == list(range(1001, 1051))

    async def drawn() -> bool:
        await room.refresh()
        return room.queues[sale_id].lottery_rank is not None

    await eventually(drawn, timeout_s=10)
    copy = room.queues[sale_id]
    positions = [room.position(copy, e.entry) for e in early]
    assert sorted(p for p in positions if p is not None) == list(range(1, 1001))
    rho = spearman(list(range(1000)), [p or 0 for p in positions])
    print(f"rank correlation of arrival and lottery position over 1000 entrants: {rho:+.3f}")
    assert abs(rho) < 0.15  # ~4.7 standard deviations of a fair draw
    assert [room.position(copy, e.entry) for e in late] == list(range(1001, 1051))


async def test_each_bot_limit_refuses_what_it_should_and_nothing_else(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    admin: dict[str, str],
    tokens: TokenService,
) -> None:
    room = app[WAITING_ROOM]

    async def refused(coro: Any) -> str | None:
        try:
            await coro
        except AppError as exc:
            reason = (exc.data or {}).get("reason") if isinstance(exc.data, dict) else None
            return f"{exc.code}:{reason}" if reason else exc.code
        return None

    def entering(sale: SaleState, user: int, ip: str = "10.1.0.1", device: str = "") -> Any:
        return room.enter(
            sale, user, client_ip=ip, device_id=device, challenge=None, solution=None, db=db
        )

    # attempts per account: the fourth call of one account is refused, not another account's
    sale = await sale_of(
        app, await queued_sale(client, db, admin, quantity=50, max_attempts_per_account=3)
    )
    u1, u2 = await make_users(db, 2)
    assert [await refused(entering(sale, u1)) for _ in range(4)] == [
        None,
        None,
        None,
        "ENTRY_LIMITED:account",
    ]
    assert await refused(entering(sale, u2)) is None

    # entrants per IP: a third account from one address is refused; elsewhere it enters,
    # and an account already in enters again from the full address
    sale = await sale_of(
        app, await queued_sale(client, db, admin, quantity=50, max_entrants_per_ip=2)
    )
    a, b, c = await make_users(db, 3)
    assert await refused(entering(sale, a, "10.2.0.1")) is None
    assert await refused(entering(sale, b, "10.2.0.1")) is None
    assert await refused(entering(sale, c, "10.2.0.1")) == "ENTRY_LIMITED:ip"
    assert await refused(entering(sale, c, "10.2.0.2")) is None
    assert await refused(entering(sale, a, "10.2.0.1")) is None

    # entrants per device id: over HTTP, the header is required and counted
    sale_id = await queued_sale(client, db, admin, quantity=50, max_entrants_per_device=1)
    d, e = await make_users(db, 2)
    resp = await enter(client, sale_id, auth(tokens, d))
    assert resp.status == 400 and (await resp.json())["error"] == "DEVICE_ID_REQUIRED"
    resp = await enter(client, sale_id, {**auth(tokens, d), "X-Device-Id": "dev-1"})
    assert resp.status == 201
    resp = await enter(client, sale_id, {**auth(tokens, e), "X-Device-Id": "dev-1"})
    assert resp.status == 429 and (await resp.json())["data"]["reason"] == "device"
    # a new id does not undo the refusal: the account keeps the device it came with
    resp = await enter(client, sale_id, {**auth(tokens, e), "X-Device-Id": "dev-2"})
    assert resp.status == 429 and (await resp.json())["data"]["reason"] == "device"
    (f,) = await make_users(db, 1)
    resp = await enter(client, sale_id, {**auth(tokens, f), "X-Device-Id": "dev-2"})
    assert resp.status == 201

    # account age: a fresh account is refused, one older than the limit enters
    sale_id = await queued_sale(client, db, admin, quantity=50, min_account_age_min=60)
    fresh, old = await make_users(db, 2)
    await db.execute(
        "UPDATE users SET created_at = now() - interval '61 minutes' WHERE id = $1", old
    )
    resp = await enter(client, sale_id, auth(tokens, fresh))
    assert resp.status == 403 and (await resp.json())["error"] == "ACCOUNT_TOO_NEW"
    assert (await enter(client, sale_id, auth(tokens, old))).status == 201

    # proof of work: no solution, a wrong one, or another account's challenge are refused
    sale_id = await queued_sale(client, db, admin, quantity=50, pow_difficulty=8)
    p, q = await make_users(db, 2)
    resp = await enter(client, sale_id, auth(tokens, p))
    body = await resp.json()
    assert resp.status == 403 and body["error"] == "PROOF_REQUIRED"
    challenge = body["data"]["challenge"]
    assert body["data"]["difficulty"] == 8
    answer = solve(challenge, 8)
    wrong = next(
        s
        for s in (format(i, "x") for i in range(10_000))
        if s != answer and not _solves(challenge, s)
    )
    assert (
        await enter(client, sale_id, auth(tokens, p), challenge=challenge, solution=wrong)
    ).status == 403
    resp = await enter(client, sale_id, auth(tokens, q), challenge=challenge, solution=answer)
    assert resp.status == 403  # p's challenge does not admit q
    resp = await client.get(f"/api/v1/flash-sales/{sale_id}/challenge", headers=auth(tokens, q))
    q_challenge = (await resp.json())["data"]["challenge"]
    resp = await enter(
        client, sale_id, auth(tokens, q), challenge=q_challenge, solution=solve(q_challenge, 8)
    )
    assert resp.status == 201
    resp = await enter(client, sale_id, auth(tokens, p), challenge=challenge, solution=answer)
    assert resp.status == 201


async def test_device_limits_count_the_account_and_the_address(
    client: TestClient[Any, Any], app: web.Application, db: asyncpg.Pool, admin: dict[str, str]
) -> None:
    """A client invents device ids for free; its accounts and its address it cannot."""
    room = app[WAITING_ROOM]

    async def entered(sale: SaleState, user: int, ip: str, device: str) -> str:
        try:
            await room.enter(
                sale, user, client_ip=ip, device_id=device, challenge=None, solution=None, db=db
            )
        except AppError as exc:
            return f"{exc.code}:{(exc.data or {}).get('reason')}"
        return "in"

    sale = await sale_of(
        app,
        await queued_sale(
            client, db, admin, quantity=50, max_entrants_per_device=1, max_devices_per_ip=3
        ),
    )
    users = await make_users(db, 7)
    here, there = "10.4.0.1", "10.4.0.2"
    assert [await entered(sale, u, here, f"d{i}") for i, u in enumerate(users[:3])] == [
        "in",
        "in",
        "in",
    ]
    # a fourth id from the same address is one too many, whichever account brings it
    assert await entered(sale, users[3], here, "d3") == "ENTRY_LIMITED:device"
    assert await entered(sale, users[4], here, "d4") == "ENTRY_LIMITED:device"
    # the refused account keeps that id: neither another new one nor a known one lets it in
    assert await entered(sale, users[3], there, "d9") == "ENTRY_LIMITED:device"
    # ids the address brought already are still full (one account each)
    assert await entered(sale, users[5], here, "d0") == "ENTRY_LIMITED:device"
    # another address brings its own ids; an account already in gets its ticket back
    assert await entered(sale, users[6], there, "d5") == "in"
    assert await entered(sale, users[0], there, "d8") == "in"
    counts = await app[FLASH].redis.hgetall(rediskeys.queue(sale.id))
    assert int(counts[b"entered"]) == 4

    # by default a sale with a device limit takes 32 ids from one address
    sale = await sale_of(
        app, await queued_sale(client, db, admin, quantity=50, max_entrants_per_device=1)
    )
    many = await make_users(db, 34)
    outcomes = [await entered(sale, u, here, f"x{i}") for i, u in enumerate(many[:33])]
    assert outcomes == ["in"] * 32 + ["ENTRY_LIMITED:device"]
    assert await entered(sale, many[33], there, "x99") == "in"


def _solves(challenge: str, solution: str) -> bool:
    from flashsale.waitingroom.signing import proof_ok

    return proof_ok(challenge, solution, 8)


async def test_a_stampede_of_5000_on_500_units_sells_exactly_500(
    client: TestClient[Any, Any],
    app: web.Application,
    db: asyncpg.Pool,
    redis: Redis,
    admin: dict[str, str],
    tokens: TokenService,
    consumer: None,
) -> None:
    sale_id = await queued_sale(
        client,
        db,
        admin,
        quantity=500,
        start_in_s=4,
        admit_per_s=150,
        overbook=1.2,
        join_window_s=5,
    )
    room = app[WAITING_ROOM]
    sale = await sale_of(app, sale_id)
    users = await make_users(db, 5000)
    entries = await enter_all(room, sale, users, db, concurrency=250)
    rng = random.Random(14)
    abandons = {e.entry.user_id for e in entries if rng.random() < 0.1}
    accepted: list[int] = []
    gone = asyncio.Event()
    deadline = time.monotonic() + 120

    async def shopper(e: Entry) -> None:
        headers = auth(tokens, e.entry.user_id)
        delay = 0.2
        while not gone.is_set() and time.monotonic() < deadline:
            view = with_join_path(
                room.status(await sale_of(app, sale_id), e.entry, now_ms(), viewer=e.entry.user_id)
            )
            if view["state"] in ("sold_out", "ended", "expired"):
                return
            if view["state"] == "admitted":
                if e.entry.user_id in abandons:
                    return
                for _ in range(20):
                    resp = await client.post(
                        view["join_path"], headers=headers, json={"quantity": 1}
                    )
                    if resp.status != 429:
                        break
                    await asyncio.sleep(int(resp.headers.get("Retry-After", "1")))
                if resp.status == 202:
                    accepted.append(e.entry.user_id)
                    if len(accepted) == 500:
                        gone.set()
                return
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 1.5)

    await asyncio.gather(*(shopper(e) for e in entries))
    assert len(accepted) == 500 and len(set(accepted)) == 500
    assert not abandons & set(accepted)
    await eventually(lambda: _eq(count_orders(db, sale_id), 500), timeout_s=30)
    sold_out_ms = int(await db.fetchval(SQL_LAST_ORDER_MS, sale_id))
    through = int(await redis.hget(rediskeys.queue(sale_id), "admitted") or 0)
    await asyncio.sleep(1.0)
    assert int(await redis.hget(rediskeys.queue(sale_id), "admitted") or 0) == through
    steps = await redis.lrange(rediskeys.queue_admissions(sale_id), 0, -1)
    last_step_ms = max(int(_text(s).split("|")[1]) for s in steps)
    assert last_step_ms <= sold_out_ms, "a shopper was admitted after the last unit sold"
    print(f"stampede: 5000 entrants, {through} admitted, 500 joined, {len(abandons)} walked away")


async def test_the_event_stream_of_a_sale_page_follows_its_stock(
    client: TestClient[Any, Any], db: asyncpg.Pool, admin: dict[str, str], tokens: TokenService
) -> None:
    import orjson

    from tests.flashkit import create_sale

    sale_id = await create_sale(client, admin, await make_sku(db), quantity=2)
    resp = await client.get(f"/api/v1/flash-sales/{sale_id}/events")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    seen: list[int] = []

    async def read() -> None:
        async for raw in resp.content:
            line = raw.decode()
            if line.startswith("data: "):
                seen.append(orjson.loads(line[6:])["remaining_quantity"])
                if seen[-1] == 1:
                    return

    reader = asyncio.create_task(read())
    (user,) = await make_users(db, 1)
    joined = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join", headers=auth(tokens, user), json={"quantity": 1}
    )
    assert joined.status == 202
    await asyncio.wait_for(reader, 10)
    assert seen[0] in (1, 2) and seen[-1] == 1
    resp.close()
    bad = await client.get(f"/api/v1/flash-sales/{sale_id}/events", params={"ticket": "x.y"})
    assert bad.status == 403 and (await bad.json())["error"] == "TICKET_INVALID"
