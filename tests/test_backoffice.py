"""Back office and fulfilment (issue 12), on the real stack: the address book, flash orders
that ship somewhere, merchant and admin order views, shipping, returns and refunds."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import secrets
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from consumers import reconcile
from flashsale.auth import TokenService
from flashsale.orders.backoffice import (
    SORTS,
    OrderQuery,
    admin_list_sql,
    merchant_count_sql,
    merchant_list_sql,
)
from flashsale.orders.model import ALL_STATUSES
from flashsale.stores import rediskeys
from tests.conftest import auth, make_user
from tests.flashkit import admin_headers, create_sale, eventually
from tests.store_helpers import ADDRESS, make_product, pay_via_sandbox, place_order, sku_row

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
BOOK_ENTRY = {
    "name": "Li Si",
    "phone": "+86 138-0013-8000",
    "region": "Zhejiang",
    "city": "Hangzhou",
    "detail": "1 West Lake Road, Room 2",
    "postcode": "310000",
}


async def _data(resp: Any, status: int = 200) -> Any:
    body = await resp.json()
    assert resp.status == status, body
    return body["data"]


async def _add_address(client: Client, h: dict[str, str], **over: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/addresses", headers=h, json={**BOOK_ENTRY, **over})
    data: dict[str, Any] = await _data(resp, 201)
    return data


async def _flash_order(
    client: Client, db: asyncpg.Pool, h: dict[str, str], sale_id: int, **body: Any
) -> str:
    resp = await client.post(
        f"/api/v1/flash-sales/{sale_id}/join", headers=h, json={"quantity": 1, **body}
    )
    order_id: str = (await _data(resp, 202))["order_id"]

    async def stored() -> bool:
        return await db.fetchval("SELECT 1 FROM orders WHERE id = $1", order_id) is not None

    await eventually(stored)
    return order_id


async def _logs(db: asyncpg.Pool, order_id: str) -> list[str]:
    rows = await db.fetch(
        "SELECT to_status FROM order_logs WHERE order_id = $1 ORDER BY id", order_id
    )
    return [r["to_status"] for r in rows]


@pytest.mark.usefixtures("consumer")
@pytest.mark.both_topologies
async def test_flash_order_ships_returns_and_refunds_end_to_end(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, rival, shopper = (
        await make_user(db, "merchant"),
        await make_user(db, "merchant"),
        await make_user(db),
    )
    mh, rh, sh = (
        auth(tokens, merchant, "merchant"),
        auth(tokens, rival, "merchant"),
        auth(tokens, shopper),
    )
    pid, (sku,) = await make_product(db, merchant, [(10_000, 50)])
    await db.execute(
        "UPDATE products SET images = '[\"https://img.test/p.jpg\"]' WHERE id = $1", pid
    )
    name = await db.fetchval("SELECT name FROM products WHERE id = $1", pid)
    home = await _add_address(client, sh)
    assert home["is_default"] is True  # the first entry is the default
    sale_id = await create_sale(client, await admin_headers(db, tokens), sku, quantity=10)

    # join with no address: the consumer gives the order the shopper's default address
    oid = await _flash_order(client, db, sh, sale_id)
    order = await _data(await client.get(f"/api/v1/orders/{oid}", headers=sh))
    assert order["shipping_info"]["address_id"] == home["address_id"]
    assert order["shipping_info"]["city"] == "Hangzhou"
    assert order["items"][0]["product_name"] == name
    assert order["items"][0]["image"] == "https://img.test/p.jpg"

    pay = await _data(
        await client.post(
            f"/api/v1/orders/{oid}/pay", headers=sh, json={"payment_method": "alipay"}
        )
    )
    await pay_via_sandbox(client, tokens, shopper, pay["payment_id"])

    # the merchant sees it; the shopper may not use merchant routes; the rival sees nothing
    listed = await _data(
        await client.get(
            "/api/v1/merchant/orders", headers=mh, params={"status": "paid", "product_id": pid}
        )
    )
    assert [o["order_id"] for o in listed["orders"]] == [oid] and listed["total"] == 1
    assert listed["orders"][0]["amount"] == 500 and listed["orders"][0]["units"] == 1
    resp = await client.get("/api/v1/merchant/orders", headers=sh)
    assert resp.status == 403
    resp = await client.get(f"/api/v1/merchant/orders/{oid}", headers=sh)
    assert resp.status == 403
    assert (await client.get(f"/api/v1/merchant/orders/{oid}", headers=rh)).status == 404
    rival_list = await _data(await client.get("/api/v1/merchant/orders", headers=rh))
    assert rival_list["total"] == 0
    ship = {"shipping_company": "SF Express", "tracking_number": "SF100200300"}
    resp = await client.post(f"/api/v1/orders/{oid}/ship", headers=rh, json=ship)
    assert resp.status == 404
    detail = await _data(await client.get(f"/api/v1/merchant/orders/{oid}", headers=mh))
    assert detail["status"] == "paid" and detail["payment_status"] == "success"
    assert detail["shipping_info"]["name"] == BOOK_ENTRY["name"]

    # ships (bulk, one shipment) with tracking; the shopper sees the tracking
    shipped = await _data(
        await client.post(
            "/api/v1/merchant/orders/ship",
            headers=mh,
            json={"shipments": [{"order_id": oid, **ship}]},
        )
    )
    assert shipped["shipped"] == 1 and shipped["results"][0]["ok"] is True
    order = await _data(await client.get(f"/api/v1/orders/{oid}", headers=sh))
    assert order["shipping_info"]["tracking_number"] == "SF100200300"
    await _data(await client.post(f"/api/v1/orders/{oid}/confirm", headers=sh))

    # the shopper asks for a return; the merchant approves twice at once: one refund
    ret = await _data(
        await client.post(
            f"/api/v1/orders/{oid}/returns",
            headers=sh,
            json={"kind": "return", "reason": "the screen is cracked"},
        ),
        201,
    )
    assert ret["status"] == "return_requested" and ret["amount"] == 500
    assert ret["items"] == [{"sku_id": sku, "quantity": 1}]
    again = await client.post(
        f"/api/v1/orders/{oid}/returns", headers=sh, json={"kind": "refund", "reason": "x"}
    )
    assert again.status == 409 and (await again.json())["error"] == "RETURN_IN_PROGRESS"
    before = await sku_row(db, sku)
    url = f"/api/v1/returns/{ret['return_id']}/approve"
    # the buyer can never approve its own return (no refund without the merchant)
    own = await client.post(url, headers=sh, json={"note": "mine"})
    assert own.status == 403
    assert (await sku_row(db, sku)) == before
    first, second = await asyncio.gather(
        client.post(url, headers=mh, json={"note": "ok"}), client.post(url, headers=mh)
    )
    results = [await _data(first), await _data(second)]
    assert sorted(r["changed"] for r in results) == [False, True]
    assert {r["status"] for r in results} == {"refunded"}
    third = await _data(await client.post(url, headers=mh))
    assert third["changed"] is False
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE order_id = $1", oid) == 1
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "refunded", "refunded_cents": 500}
    after = await sku_row(db, sku)
    assert after["on_hand"] == before["on_hand"] + 1  # stock back, once
    order = await _data(await client.get(f"/api/v1/orders/{oid}", headers=sh))
    assert order["status"] == "refunded" and order["returns"][0]["status"] == "refunded"
    assert await _logs(db, oid) == [
        "paid",
        "shipped",
        "completed",
        "return_requested",
        "return_approved",
        "refunded",
    ]
    rejected = await client.post(
        f"/api/v1/returns/{ret['return_id']}/reject", headers=mh, json={"note": "no"}
    )
    assert rejected.status == 409
    # the admin sees the order and its whole log
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    full = await _data(await client.get(f"/api/v1/admin/orders/{oid}", headers=admin))
    assert [entry["to_status"] for entry in full["logs"]][-1] == "refunded"
    found = await _data(
        await client.get("/api/v1/admin/orders", headers=admin, params={"user_id": shopper})
    )
    assert [o["order_id"] for o in found["orders"]] == [oid]


@pytest.mark.usefixtures("consumer")
async def test_an_order_without_address_cannot_be_paid_or_shipped(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    sh, mh = auth(tokens, shopper), auth(tokens, merchant, "merchant")
    _, (sku,) = await make_product(db, merchant, [(10_000, 50)])
    sale_id = await create_sale(client, await admin_headers(db, tokens), sku, quantity=10, limit=2)
    oid = await _flash_order(client, db, sh, sale_id)  # no address book at all
    assert await db.fetchval("SELECT shipping_address FROM orders WHERE id = $1", oid) is None
    resp = await client.post(
        f"/api/v1/orders/{oid}/pay", headers=sh, json={"payment_method": "alipay"}
    )
    assert resp.status == 409 and (await resp.json())["error"] == "ADDRESS_REQUIRED"
    # naming an entry at payment gives the order its address
    office = await _add_address(client, sh, is_default=False, city="Shanghai")
    pay = await _data(
        await client.post(
            f"/api/v1/orders/{oid}/pay",
            headers=sh,
            json={"payment_method": "wechat", "address_id": office["address_id"]},
        )
    )
    stored = await db.fetchval("SELECT shipping_address FROM orders WHERE id = $1", oid)
    assert stored["city"] == "Shanghai" and stored["address_id"] == office["address_id"]
    await pay_via_sandbox(client, tokens, shopper, pay["payment_id"])
    # a paid order with no address (paid before addresses were required) does not ship
    await db.execute("UPDATE orders SET shipping_address = NULL WHERE id = $1", oid)
    ship = {"shipping_company": "SF", "tracking_number": "SF1"}
    resp = await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship)
    assert resp.status == 409 and (await resp.json())["error"] == "ADDRESS_REQUIRED"
    # a join naming an entry uses it, not the default
    oid2 = await _flash_order(client, db, sh, sale_id, address_id=office["address_id"])
    stored = await db.fetchval("SELECT shipping_address FROM orders WHERE id = $1", oid2)
    assert stored["address_id"] == office["address_id"]


async def test_address_book(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    user, other = await make_user(db), await make_user(db)
    h, oh = auth(tokens, user), auth(tokens, other)
    first = await _add_address(client, h)
    second = await _add_address(client, h, is_default=True, city="Ningbo")
    book = await _data(await client.get("/api/v1/addresses", headers=h))
    assert [a["address_id"] for a in book] == [second["address_id"], first["address_id"]]
    assert [a["is_default"] for a in book] == [True, False]
    bad = {
        **BOOK_ENTRY,
        "name": "Li\x07Si",
        "phone": "call me",
        "postcode": "31 00 00 000 000",
        "detail": " ",
    }
    resp = await client.post("/api/v1/addresses", headers=h, json=bad)
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"name", "phone", "postcode", "detail"}
    resp = await client.post("/api/v1/addresses", headers=h, json={"name": "A", "phone": "123"})
    assert resp.status == 422
    # another user's entry is a 404 everywhere
    url = f"/api/v1/addresses/{first['address_id']}"
    assert (await client.get(url, headers=oh)).status == 404
    assert (await client.put(url, headers=oh, json=BOOK_ENTRY)).status == 404
    assert (await client.delete(url, headers=oh)).status == 404
    updated = await _data(await client.put(url, headers=h, json={**BOOK_ENTRY, "detail": "2 Rd"}))
    assert updated["detail"] == "2 Rd" and updated["is_default"] is False
    # deleting the default makes the newest remaining one the default
    await _data(await client.delete(f"/api/v1/addresses/{second['address_id']}", headers=h))
    book = await _data(await client.get("/api/v1/addresses", headers=h))
    assert [(a["address_id"], a["is_default"]) for a in book] == [(first["address_id"], True)]
    # concurrent "make me the default" leave exactly one default
    await asyncio.gather(*(_add_address(client, h, is_default=True) for _ in range(5)))
    assert (
        await db.fetchval("SELECT count(*) FROM addresses WHERE user_id = $1 AND is_default", user)
        == 1
    )


async def test_orders_take_an_address_id_or_an_inline_address(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, user, other = (
        await make_user(db, "merchant"),
        await make_user(db),
        await make_user(db),
    )
    h = auth(tokens, user)
    _, (sku,) = await make_product(db, merchant, [(1_000, 20)])
    entry = await _add_address(client, h)
    items = [{"sku_id": sku, "quantity": 1}]
    made = await _data(
        await client.post(
            "/api/v1/orders", headers=h, json={"items": items, "address_id": entry["address_id"]}
        ),
        201,
    )
    stored = await db.fetchval(
        "SELECT shipping_address FROM orders WHERE id = $1", made["order_id"]
    )
    assert stored["address_id"] == entry["address_id"]
    assert stored["address"] == "Zhejiang Hangzhou 1 West Lake Road, Room 2"
    # editing the entry later changes no order: it keeps its snapshot
    await client.put(
        f"/api/v1/addresses/{entry['address_id']}", headers=h, json={**BOOK_ENTRY, "city": "X"}
    )
    again = await db.fetchval("SELECT shipping_address FROM orders WHERE id = $1", made["order_id"])
    assert again["city"] == "Hangzhou"
    both = {"items": items, "address_id": entry["address_id"], "shipping_address": ADDRESS}
    assert (await client.post("/api/v1/orders", headers=h, json=both)).status == 422
    assert (await client.post("/api/v1/orders", headers=h, json={"items": items})).status == 422
    theirs = await client.post(
        "/api/v1/orders",
        headers=auth(tokens, other),
        json={"items": items, "address_id": entry["address_id"]},
    )
    assert theirs.status == 404 and (await theirs.json())["error"] == "ADDRESS_NOT_FOUND"
    status, body = await place_order(client, tokens, user, sku)  # seed 000's one-line form
    assert status == 201, body


async def test_merchant_list_filters_pages_sorts_and_exports(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant, rival, user = (
        await make_user(db, "merchant"),
        await make_user(db, "merchant"),
        (await make_user(db)),
    )
    mh = auth(tokens, merchant, "merchant")
    p1, (sku1,) = await make_product(db, merchant, [(1_000, 50)])
    _, (sku2,) = await make_product(db, merchant, [(3_000, 50)])
    _, (rival_sku,) = await make_product(db, rival, [(7_000, 50)])
    h = auth(tokens, user)
    formula = {**ADDRESS, "name": '=HYPERLINK("x")'}
    ids = []
    for sku in (sku1, sku2, sku1):
        resp = await client.post(
            "/api/v1/orders",
            headers=h,
            json={
                "items": [{"sku_id": sku, "quantity": 2}, {"sku_id": rival_sku, "quantity": 1}],
                "shipping_address": formula,
            },
        )
        created = await _data(resp, 201)
        ids.append(created["order_id"])
    # the newest is paid: a merchant sees the buyer's contact only on what it must ship
    await pay_via_sandbox(client, tokens, user, created["payment_id"])
    page = await _data(
        await client.get("/api/v1/merchant/orders", headers=mh, params={"limit": 2, "page": 1})
    )
    assert page["total"] == 3 and [o["order_id"] for o in page["orders"]] == ids[::-1][:2]
    page2 = await _data(
        await client.get("/api/v1/merchant/orders", headers=mh, params={"limit": 2, "page": 2})
    )
    assert [o["order_id"] for o in page2["orders"]] == [ids[0]]
    oldest = await _data(
        await client.get("/api/v1/merchant/orders", headers=mh, params={"sort": "created_at,asc"})
    )
    assert [o["order_id"] for o in oldest["orders"]] == ids
    assert [o["amount"] for o in oldest["orders"]] == [2_000, 6_000, 2_000]  # its lines only
    only_p1 = await _data(
        await client.get("/api/v1/merchant/orders", headers=mh, params={"product_id": p1})
    )
    assert {o["order_id"] for o in only_p1["orders"]} == {ids[0], ids[2]}
    one = await _data(
        await client.get("/api/v1/merchant/orders", headers=mh, params={"order_id": ids[1]})
    )
    assert [o["order_id"] for o in one["orders"]] == [ids[1]]
    none = await _data(
        await client.get(
            "/api/v1/merchant/orders", headers=mh, params={"status": "shipped", "to": "1999-01-01"}
        )
    )
    assert none["total"] == 0
    detail = await _data(await client.get(f"/api/v1/merchant/orders/{ids[1]}", headers=mh))
    assert [i["sku_id"] for i in detail["items"]] == [sku2] and detail["amount"] == 6_000
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    full = await _data(await client.get(f"/api/v1/merchant/orders/{ids[1]}", headers=admin))
    assert [i["sku_id"] for i in full["items"]] == [sku2, rival_sku]  # an admin sees every line
    resp = await client.get("/api/v1/merchant/orders/export", headers=mh)
    assert resp.status == 200 and resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["order_id"] for r in rows] == ids[::-1]
    assert rows[0]["items"] == f"{sku1}x2" and rows[0]["name"].startswith("'=")
    assert rows[1]["name"] == ""  # unpaid: no contact
    bad = await client.get("/api/v1/merchant/orders", headers=mh, params={"sort": "id"})
    assert bad.status == 422
    # a merchant that owns only part of an order cannot ship it alone; results say why
    shipped = await _data(
        await client.post(
            "/api/v1/merchant/orders/ship",
            headers=mh,
            json={
                "shipments": [
                    {"order_id": i, "shipping_company": "SF", "tracking_number": "T"} for i in ids
                ]
            },
        )
    )
    assert shipped["shipped"] == 0 and {r["error"] for r in shipped["results"]} == {"NOT_FOUND"}


async def test_admin_searches_users_and_disabling_ends_tokens(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    admin = auth(tokens, await make_user(db, "admin"), "admin")
    tag = secrets.token_hex(4)
    uid = await db.fetchval(
        "INSERT INTO users (email, password_hash, nickname) VALUES ($1, 'x', $2) RETURNING id",
        f"Find.{tag}@Example.test",
        f"Nick{tag}",
    )
    for q in (f"find.{tag}", f"nick{tag}", str(uid)):
        found = await _data(await client.get("/api/v1/admin/users", headers=admin, params={"q": q}))
        assert [u["id"] for u in found["users"]] == [uid], q
    wild = await _data(await client.get("/api/v1/admin/users", headers=admin, params={"q": "%"}))
    assert wild["users"] == []  # LIKE wildcards are text
    user_token = auth(tokens, uid)
    assert (await client.get("/api/v1/users/me", headers=user_token)).status == 200
    await _data(
        await client.patch(f"/api/v1/admin/users/{uid}", headers=admin, json={"disabled": True})
    )

    async def refused() -> bool:
        resp = await client.get("/api/v1/users/me", headers=user_token)
        return resp.status == 401

    await eventually(refused, timeout_s=1.0)
    disabled = await _data(
        await client.get("/api/v1/admin/users", headers=admin, params={"q": str(uid)})
    )
    assert disabled["users"][0]["disabled"] is True
    resp = await client.get("/api/v1/admin/users", headers=auth(tokens, uid, "merchant"))
    assert resp.status in (401, 403)


def _sorted_rows(plan: str) -> int:
    """The rows the plan's top Sort node took in (EXPLAIN ANALYZE): its child's actual rows."""
    lines = plan.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("->  Sort"))
    child = next(line for line in lines[at + 1 :] if line.lstrip().startswith("->"))
    return int(re.search(r"actual time=\S+ rows=(\d+)", child)[1])  # type: ignore[index]


async def test_every_order_status_is_one_the_lists_read(db: asyncpg.Pool) -> None:
    """A list of every status reads one status at a time: a status the constraint allows
    and ALL_STATUSES lacks would be missing from it."""
    check = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'orders_status_check'"
    )
    assert set(re.findall(r"'([a-z_]+)'", check)) == set(ALL_STATUSES)


async def test_merchant_list_answers_from_an_index_at_100k_orders(db: asyncpg.Pool) -> None:
    """The rows are made and the plan read in one transaction that is rolled back."""
    merchant = await make_user(db, "merchant")
    buyer = await make_user(db)
    pid, (sku,) = await make_product(db, merchant, [(100, 10)])
    async with db.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute(
                "INSERT INTO orders (id, user_id, kind, status, total_cents, pay_cents, created_at)"
                " SELECT 'X' || g, $1, 'regular',"
                " (ARRAY['paid','shipped','completed','pending_payment'])[1 + g % 4], 100, 100,"
                " now() - make_interval(secs => g) FROM generate_series(1, 100000) g",
                buyer,
            )
            await conn.execute(
                "INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents)"
                " SELECT 'X' || g, $1, $2, 1, 100 FROM generate_series(1, 100000) g",
                pid,
                sku,
            )
            await conn.execute("ANALYZE merchant_orders")
            await conn.execute("ANALYZE orders")
            n = await conn.fetchval(
                "SELECT count(*) FROM merchant_orders WHERE merchant_id = $1", merchant
            )
            assert n == 100_000
            plans = {}
            for name, q in (
                ("newest", OrderQuery()),
                ("paid", OrderQuery(status="paid")),
            ):
                sql, args = merchant_list_sql(q, limit=20, offset=0)
                rows = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF) " + sql, merchant, *args)
                plans[name] = "\n".join(r[0] for r in rows)
                print(f"--- merchant list ({name}) at 100k orders ---\n{plans[name]}")
            sql, args = merchant_count_sql(OrderQuery(status="paid"))
            rows = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF) " + sql, merchant, *args)
            plans["count"] = "\n".join(r[0] for r in rows)
            print(f"--- merchant list total (paid) ---\n{plans['count']}")
            sql, args = admin_list_sql(OrderQuery())
            rows = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF) " + sql, *args)
            plans["admin"] = "\n".join(r[0] for r in rows)
            print(f"--- admin list (newest) ---\n{plans['admin']}")
            # the total reads merchant_orders alone (here every row is this merchant's, so a
            # scan of the table is the planner's right answer); never the orders themselves
            assert " on orders" not in plans["count"]
            for name in ("newest", "paid"):
                assert "merchant_orders_status_idx" in plans[name], plans[name]
            assert "orders_status_created_idx" in plans["admin"], plans["admin"]
            for plan in plans["newest"], plans["paid"], plans["admin"]:
                assert "Seq Scan" not in plan
            assert "Sort" not in plans["paid"]  # one status: 20 index entries in order
            # every status: 20 entries of each status's index, merged (the sort's input)
            for name in ("newest", "admin"):
                assert _sorted_rows(plans[name]) <= 20 * len(ALL_STATUSES), plans[name]
            # and the same pages as one sort of every row would give
            for sort in SORTS:
                for page in (1, 3):
                    q = OrderQuery(sort=sort, page=page, limit=20)
                    sql, args = merchant_list_sql(q, limit=20, offset=40 * (page > 1))
                    merged = [r["order_id"] for r in await conn.fetch(sql, merchant, *args)]
                    direction = "DESC" if sort.endswith("desc") else "ASC"
                    expected = await conn.fetch(
                        "SELECT order_id FROM merchant_orders WHERE merchant_id = $1"
                        f" ORDER BY created_at {direction}, order_id {direction}"
                        " LIMIT 20 OFFSET $2",
                        merchant,
                        40 * (page > 1),
                    )
                    assert merged == [r["order_id"] for r in expected], (sort, page)
        finally:
            await tr.rollback()


async def _shipped_order(
    client: Client, db: asyncpg.Pool, tokens: TokenService, *, price: int, quantity: int
) -> tuple[str, int, dict[str, str], dict[str, str]]:
    """A paid and shipped regular order: (order id, sku, shopper headers, merchant headers)."""
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    mh = auth(tokens, merchant, "merchant")
    _, (sku,) = await make_product(db, merchant, [(price, 20)])
    status, body = await place_order(client, tokens, shopper, sku, quantity)
    assert status == 201, body
    oid = body["data"]["order_id"]
    await pay_via_sandbox(client, tokens, shopper, body["data"]["payment_id"])
    ship = {"shipping_company": "YTO", "tracking_number": "YT1"}
    await _data(await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship))
    return oid, sku, auth(tokens, shopper), mh


async def test_partial_refund_reject_and_a_second_request(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    oid, sku, sh, mh = await _shipped_order(client, db, tokens, price=1_000, quantity=3)
    url = f"/api/v1/orders/{oid}/returns"
    paid = await db.fetchval("SELECT pay_cents FROM orders WHERE id = $1", oid)
    too_much = await client.post(
        url, headers=sh, json={"kind": "refund", "reason": "late", "amount": paid + 1}
    )
    assert too_much.status == 409 and (await too_much.json())["error"] == "REFUND_EXCEEDS_PAID"
    not_a_line = await client.post(
        url,
        headers=sh,
        json={"kind": "return", "reason": "x", "items": [{"sku_id": sku + 10_000, "quantity": 1}]},
    )
    assert not_a_line.status == 422
    # a partial money-only refund: rejected with a note, then asked again and approved
    first = await _data(
        await client.post(
            url, headers=sh, json={"kind": "refund", "reason": "late", "amount": 500}
        ),
        201,
    )
    rejected = await _data(
        await client.post(
            f"/api/v1/returns/{first['return_id']}/reject", headers=mh, json={"note": "on time"}
        )
    )
    assert rejected["status"] == "return_rejected" and rejected["decision_note"] == "on time"
    again = await client.post(f"/api/v1/returns/{first['return_id']}/approve", headers=mh)
    assert again.status == 409
    second = await _data(
        await client.post(
            url, headers=sh, json={"kind": "refund", "reason": "late", "amount": 500}
        ),
        201,
    )
    before = await sku_row(db, sku)
    done = await _data(
        await client.post(f"/api/v1/returns/{second['return_id']}/approve", headers=mh)
    )
    assert done["status"] == "refunded" and done["refund"]["refund_amount"] == 500
    assert await sku_row(db, sku) == before  # money only: no stock moves
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "shipped", "refunded_cents": 500}
    # then one unit comes back with all the money that is left
    third = await _data(
        await client.post(
            url,
            headers=sh,
            json={
                "kind": "return",
                "reason": "wrong size",
                "items": [{"sku_id": sku, "quantity": 1}],
            },
        ),
        201,
    )
    assert third["amount"] == 1_000  # what one unit is worth
    queue = await _data(
        await client.get(
            "/api/v1/merchant/returns", headers=mh, params={"status": "return_requested"}
        )
    )
    assert [r["return_id"] for r in queue["returns"]] == [third["return_id"]]
    # the merchant, explicitly, gives back everything that is left
    approved = await _data(
        await client.post(
            f"/api/v1/returns/{third['return_id']}/approve",
            headers=mh,
            json={"refund_amount": paid - 500},
        )
    )
    assert approved["approved_amount"] == paid - 500
    after = await sku_row(db, sku)
    assert (after["on_hand"], after["sold"]) == (before["on_hand"] + 1, before["sold"] - 1)
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "refunded", "refunded_cents": paid}
    nothing_left = await client.post(url, headers=sh, json={"kind": "refund", "reason": "x"})
    assert nothing_left.status == 409
    # not shipped yet: the shopper refunds directly (POST /payment/refund), no return
    status, body = await place_order(client, tokens, (await make_user(db)), sku)
    assert status == 201
    early = await client.post(
        f"/api/v1/orders/{body['data']['order_id']}/returns",
        headers=sh,
        json={"kind": "refund", "reason": "x"},
    )
    assert early.status == 404  # not the caller's order


async def test_a_return_refunds_what_its_lines_are_worth(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    oid, sku, sh, mh = await _shipped_order(client, db, tokens, price=19_900, quantity=2)
    url = f"/api/v1/orders/{oid}/returns"
    paid = await db.fetchval("SELECT pay_cents FROM orders WHERE id = $1", oid)
    one = {"kind": "return", "reason": "one too many", "items": [{"sku_id": sku, "quantity": 1}]}
    asked = await _data(await client.post(url, headers=sh, json=one), 201)
    assert asked["amount"] == 19_900 and asked["approved_amount"] is None
    done = await _data(
        await client.post(f"/api/v1/returns/{asked['return_id']}/approve", headers=mh)
    )
    assert done["refund"]["refund_amount"] == 19_900 and done["approved_amount"] is None
    row = await db.fetchrow("SELECT status, refunded_cents FROM orders WHERE id = $1", oid)
    assert row is not None and dict(row) == {"status": "shipped", "refunded_cents": 19_900}

    # asking for more than the lines are worth does not make the approval pay it ...
    other, sku2, sh2, mh2 = await _shipped_order(client, db, tokens, price=19_900, quantity=2)
    one2 = {**one, "items": [{"sku_id": sku2, "quantity": 1}], "amount": 39_800}
    asked = await _data(
        await client.post(f"/api/v1/orders/{other}/returns", headers=sh2, json=one2), 201
    )
    assert asked["amount"] == 39_800
    done = await _data(
        await client.post(f"/api/v1/returns/{asked['return_id']}/approve", headers=mh2)
    )
    assert done["refund"]["refund_amount"] == 19_900
    # ... only an explicit approval does, within what was paid
    third, sku3, sh3, mh3 = await _shipped_order(client, db, tokens, price=19_900, quantity=2)
    paid3 = await db.fetchval("SELECT pay_cents FROM orders WHERE id = $1", third)
    asked = await _data(
        await client.post(
            f"/api/v1/orders/{third}/returns",
            headers=sh3,
            json={**one, "items": [{"sku_id": sku3, "quantity": 1}]},
        ),
        201,
    )
    approve = f"/api/v1/returns/{asked['return_id']}/approve"
    resp = await client.post(approve, headers=mh3, json={"refund_amount": paid3 + 1})
    assert resp.status == 409 and (await resp.json())["error"] == "REFUND_EXCEEDS_PAID"
    done = await _data(await client.post(approve, headers=mh3, json={"refund_amount": 30_000}))
    assert done["refund"]["refund_amount"] == 30_000 and done["approved_amount"] == 30_000
    assert paid == paid3


async def test_a_returns_share_takes_the_discount_off_in_proportion(db: asyncpg.Pool) -> None:
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    _, (a, b) = await make_product(db, merchant, [(3_000, 5), (1_000, 5)])
    oid = "RSHARE" + secrets.token_hex(6)
    await db.execute(
        "INSERT INTO orders (id, user_id, kind, status, total_cents, discount_cents, "
        "shipping_cents, pay_cents, payment_deadline) "
        "VALUES ($1, $2, 'regular', 'shipped', 7000, 700, 500, 6800, now())",
        oid,
        shopper,
    )
    product = await db.fetchval("SELECT product_id FROM skus WHERE id = $1", a)
    await db.executemany(
        "INSERT INTO order_items (order_id, product_id, sku_id, quantity, price_cents) "
        "VALUES ($1, $2, $3, $4, $5)",
        [(oid, product, a, 2, 3_000), (oid, product, b, 1, 1_000)],
    )

    async def share(items: list[dict[str, int]]) -> int:
        value: int = await db.fetchval("SELECT return_share_cents($1, $2::jsonb)", oid, items)
        return value

    assert await share([{"sku_id": a, "quantity": 1}]) == 2_700  # 3,000 less 10 %
    assert await share([{"sku_id": b, "quantity": 1}]) == 900
    everything = [{"sku_id": a, "quantity": 2}, {"sku_id": b, "quantity": 1}]
    assert await share(everything) == 6_300  # the goods paid; shipping is not in it
    assert await share([{"sku_id": b + 999, "quantity": 1}]) == 0
    # written by hand as shipped with no payment: once priced, it must not stand in this
    # shared database as money drift for reconcile, which other tests run
    await db.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", oid)


@pytest.mark.usefixtures("consumer")
async def test_a_paid_flash_order_refunded_before_shipping_gives_its_unit_back(
    client: Client, db: asyncpg.Pool, tokens: TokenService, redis: Redis
) -> None:
    merchant, shopper = await make_user(db, "merchant"), await make_user(db)
    sh, mh = auth(tokens, shopper), auth(tokens, merchant, "merchant")
    _, (sku,) = await make_product(db, merchant, [(10_000, 50)])
    await _add_address(client, sh)
    sale_id = await create_sale(client, await admin_headers(db, tokens), sku, quantity=3)
    oid = await _flash_order(client, db, sh, sale_id)
    pay = await _data(
        await client.post(
            f"/api/v1/orders/{oid}/pay", headers=sh, json={"payment_method": "alipay"}
        )
    )
    await pay_via_sandbox(client, tokens, shopper, pay["payment_id"])
    assert await redis.hget(rediskeys.sale(sale_id), "remaining") == b"2"

    body = {"order_id": oid, "refund_amount": 1, "reason": "keep a cent"}
    resp = await client.post("/api/v1/payment/refund", headers=sh, json=body)
    assert resp.status == 409 and (await resp.json())["error"] == "FULL_REFUND_REQUIRED"
    done = await _data(
        await client.post(
            "/api/v1/payment/refund", headers=sh, json={"order_id": oid, "reason": "changed"}
        )
    )
    assert done["order_status"] == "cancelled" and done["refund_amount"] == pay["amount"]

    async def back_on_sale() -> bool:
        return await redis.hget(rediskeys.sale(sale_id), "remaining") == b"3"

    await eventually(back_on_sale)  # the sweeper returns a cancelled order's units once
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None and sale["sold_quantity"] == 0
    report = await reconcile.check_sale(db, redis, sale)
    assert report.drift == 0 and not report.user_drift, report.line()
    ship = {"shipping_company": "SF", "tracking_number": "SF2"}
    resp = await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship)
    assert resp.status == 409
    # the shopper may join again: the unit and the per-user allowance came back
    again = await _flash_order(client, db, sh, sale_id)
    assert again != oid


@pytest.mark.unit
def test_order_event_carries_an_optional_address_id() -> None:
    from flashsale.flash.events import BadEvent, OrderEvent, decode

    event = OrderEvent("123", 1, 2, 3, 4, 1, 500, 10, 9, address_id=7)
    assert decode(event.encode()) == event
    older = event.encode().replace(b',"address_id":7', b"")
    assert b"address_id" not in older and decode(older).address_id is None
    with pytest.raises(BadEvent, match="address_id"):
        decode(event.encode().replace(b'"address_id":7', b'"address_id":"7"'))


async def test_merchant_sees_buyer_contact_only_on_orders_it_ships(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    merchant = await make_user(db, "merchant")
    mh = auth(tokens, merchant, "merchant")
    _, (sku,) = await make_product(db, merchant, [(1_000, 50)])
    orders: dict[str, str] = {}
    for state in ("pending", "cancelled", "paid", "refunded", "shipped"):
        shopper = await make_user(db)
        sh = auth(tokens, shopper)
        status, data = await place_order(client, tokens, shopper, sku)
        assert status == 201, data
        oid, pay = data["data"]["order_id"], data["data"]["payment_id"]
        orders[state] = oid
        if state == "cancelled":
            await _data(await client.post(f"/api/v1/orders/{oid}/cancel", headers=sh, json={}))
        if state in ("paid", "refunded", "shipped"):
            await pay_via_sandbox(client, tokens, shopper, pay)
        if state == "refunded":
            body = {"order_id": oid, "reason": "no longer needed"}
            await _data(await client.post("/api/v1/payment/refund", headers=sh, json=body))
        if state == "shipped":
            ship = {"shipping_company": "SF", "tracking_number": "SF7"}
            await _data(await client.post(f"/api/v1/orders/{oid}/ship", headers=mh, json=ship))
    seen = {"paid", "shipped"}

    listed = await _data(await client.get("/api/v1/merchant/orders", headers=mh))
    by_id = {o["order_id"]: o for o in listed["orders"]}
    export = await client.get("/api/v1/merchant/orders/export", headers=mh)
    rows = {r["order_id"]: r for r in csv.DictReader(io.StringIO(await export.text()))}
    for state, oid in orders.items():
        info = by_id[oid]["shipping_info"]
        detail = await _data(await client.get(f"/api/v1/merchant/orders/{oid}", headers=mh))
        if state in seen:
            assert info["name"] == ADDRESS["name"] and info["phone"] == ADDRESS["phone"], state
            assert detail["shipping_info"]["address"] == ADDRESS["address"], state
            assert (rows[oid]["name"], rows[oid]["phone"], rows[oid]["address"]) == (
                ADDRESS["name"],
                ADDRESS["phone"],
                ADDRESS["address"],
            ), state
        else:
            assert all(info[k] is None for k in ("name", "phone", "address", "city")), state
            assert detail["shipping_info"]["phone"] is None, state
            assert rows[oid]["name"] == rows[oid]["phone"] == rows[oid]["address"] == "", state
    # an admin still sees every address
    admin = await admin_headers(db, tokens)
    detail = await _data(
        await client.get(f"/api/v1/merchant/orders/{orders['pending']}", headers=admin)
    )
    assert detail["shipping_info"]["phone"] == ADDRESS["phone"]
