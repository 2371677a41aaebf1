"""One grep follows an order: the join's request id travels with its event to the consumer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, make_mocked_request
from aiohttp.web import Response

from flashsale.auth import TokenService
from flashsale.flash.events import OrderEvent, decode
from flashsale.timing import ACCESS_LOG_FLUSH_AFTER_S
from gateway import appkeys
from gateway.accesslog import FLUSH_AT_BYTES, JsonAccessLogger, LineBuffer
from gateway.middlewares import REQUEST_ID
from stack.logs import JsonFormatter
from tests.flashkit import (
    admin_headers,
    count_orders,
    create_sale,
    eventually,
    make_sku,
    make_users,
)

_EVENT = OrderEvent(
    order_id="123",
    sale_id=1,
    user_id=2,
    sku_id=3,
    product_id=4,
    quantity=1,
    price_cents=500,
    payment_deadline_ms=1,
    reserved_at_ms=1,
    request_id="req-1",
)


@pytest.mark.unit
def test_request_id_round_trips_and_never_costs_an_order() -> None:
    assert decode(_EVENT.encode()).request_id == "req-1"
    raw = orjson.loads(_EVENT.encode())
    for bad in (None, 7, "x" * 129):
        raw["request_id"] = bad
        assert decode(orjson.dumps(raw)).request_id == ""  # dropped, the order still parses
    del raw["request_id"]  # events from before the field existed
    assert decode(orjson.dumps(raw)).order_id == "123"


@pytest.mark.unit
def test_access_line_names_the_order() -> None:
    written: list[bytes] = []
    access = JsonAccessLogger(logging.getLogger("gateway.access"), "")
    access.buffer = LineBuffer(written.append)
    request = make_mocked_request("POST", "/api/v1/flash-sales/1/join")
    request[appkeys.ORDER_ID] = "987"
    response = Response(status=202, headers={REQUEST_ID: "req-9"})
    access.log(request, response, 0.001)  # no running loop: written at once
    (line,) = [orjson.loads(raw) for raw in b"".join(written).splitlines()]
    assert line["order_id"] == "987" and line["request_id"] == "req-9"
    assert line["msg"] == "POST /api/v1/flash-sales/1/join 202" and line["level"] == "INFO"
    # the same shape as every other log line, so one reader takes both
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "x", None, None)
    assert set(orjson.loads(JsonFormatter().format(record))) <= set(line)


@pytest.mark.unit
async def test_access_lines_go_out_together() -> None:
    written: list[bytes] = []
    buffer = LineBuffer(written.append)
    for n in range(3):
        buffer.add(b"%d\n" % n)
    assert written == []  # held for one write
    await asyncio.sleep(ACCESS_LOG_FLUSH_AFTER_S * 4)
    assert written == [b"0\n1\n2\n"]
    buffer.add(b"x" * FLUSH_AT_BYTES + b"\n")  # a full buffer goes at once
    assert len(written) == 2


@pytest.mark.integration
async def test_consumer_line_carries_the_join_request_id(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    tokens: TokenService,
    consumer: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db), quantity=5)
    (uid,) = await make_users(db, 1)
    headers = {
        "Authorization": f"Bearer {tokens.issue(uid, 'user')}",
        REQUEST_ID: "trace-req-42",
    }
    with caplog.at_level(logging.INFO, logger="consumers.order_events"):
        resp = await client.post(
            f"/api/v1/flash-sales/{sale_id}/join", headers=headers, json={"quantity": 1}
        )
        assert resp.status == 202, await resp.text()
        assert resp.headers[REQUEST_ID] == "trace-req-42"
        order_id = (await resp.json())["data"]["order_id"]

        async def persisted() -> bool:
            return await count_orders(db, sale_id) == 1

        await eventually(persisted)

        async def logged() -> bool:
            return any(
                getattr(r, "orders", {}).get(order_id) == "trace-req-42" for r in caplog.records
            )

        await eventually(logged, timeout_s=5)
    line = next(r for r in caplog.records if order_id in getattr(r, "orders", {}))
    assert order_id in JsonFormatter().format(line)  # `grep <order id>` finds this line


@pytest.mark.unit
def test_access_lines_held_for_a_stopped_loop_go_out_with_the_next() -> None:
    written: list[bytes] = []
    buffer = LineBuffer(written.append)

    async def one(line: bytes) -> None:
        buffer.add(line)

    asyncio.run(one(b"a\n"))  # held: its loop ends before the timer fires
    asyncio.run(one(b"b\n"))  # another loop: what the first held goes out first
    buffer.flush()
    assert b"".join(written) == b"a\nb\n"
