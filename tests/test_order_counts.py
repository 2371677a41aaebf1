"""A flash sale's order counters (migration 0120), the dashboard's orders by status: equal to
a count of the sale's orders after every path that writes them, alone and side by side."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from consumers import sweepers
from consumers.order_events import persist
from flashsale.dashboard.snapshot import SQL_ORDERS_BY_STATUS
from flashsale.flash import lifecycle
from flashsale.flash.events import OrderEvent
from flashsale.orders import states
from flashsale.orders.model import SQL_ORDER_FOR_UPDATE, SYSTEM, Actor
from flashsale.settings import Settings
from flashsale.stores.db import load_migrations, migrate
from flashsale.stores.metrics import get_metrics
from tests.flashkit import forget_sale, make_sku, make_users

pytestmark = pytest.mark.integration

# What the dashboard counted before the counters, and what they must still say.
SQL_RECOUNT = """
SELECT status, count(*) AS n,
       count(*) FILTER (WHERE cancel_reason = 'payment_timeout') AS expired
FROM orders WHERE flash_sale_id = $1 GROUP BY status
"""
SQL_SALE = """
INSERT INTO flash_sales (sku_id, product_id, flash_price_cents, quantity, per_user_limit,
                         start_at, end_at, payment_window_s)
SELECT id, product_id, 500, $2, 1000, now(), now() + interval '1 hour', 900
FROM skus WHERE id = $1
RETURNING id
"""
SQL_COUNTER_VERSIONS = """
SELECT status, slot, xmin::text AS xmin FROM flash_sale_order_counts WHERE flash_sale_id = $1
"""
SQL_DELETE_ORDERS = (
    "DELETE FROM order_items WHERE order_id = ANY($1::text[])",
    "DELETE FROM inventory_ledger WHERE order_id = ANY($1::text[])",
    "DELETE FROM orders WHERE id = ANY($1::text[])",
)
ORDER_IDS = itertools.count(time.time_ns())
Figures = dict[str, tuple[int, int]]  # status -> (orders, of them expired)


async def figures(db: asyncpg.Pool, sale_id: int) -> Figures:
    """The counters' figures, after checking that a count of the orders says the same."""
    kept = {
        r["status"]: (r["n"], r["expired"]) for r in await db.fetch(SQL_ORDERS_BY_STATUS, sale_id)
    }
    counted = {r["status"]: (r["n"], r["expired"]) for r in await db.fetch(SQL_RECOUNT, sale_id)}
    assert kept == counted
    return kept


NewSale = Callable[[int], Awaitable[tuple[int, int, int]]]


@pytest.fixture
async def new_sale(db: asyncpg.Pool) -> AsyncIterator[NewSale]:
    """Makes sales in PostgreSQL only (sale id, sku id, product id) and removes them with
    their orders afterwards: some are written beyond their allotment on purpose."""
    made: list[int] = []

    async def make(quantity: int) -> tuple[int, int, int]:
        sku = await make_sku(db)
        sale_id: int = await db.fetchval(SQL_SALE, sku, quantity)
        made.append(sale_id)
        product: int = await db.fetchval("SELECT product_id FROM skus WHERE id = $1", sku)
        return sale_id, sku, product

    yield make
    for sale_id in made:
        await forget_sale(db, None, sale_id)


def events_for(sale: tuple[int, int, int], users: list[int], n: int) -> list[OrderEvent]:
    sale_id, sku, product = sale
    now_ms = int(time.time() * 1000)
    return [
        OrderEvent(
            order_id=str(next(ORDER_IDS)),
            sale_id=sale_id,
            user_id=users[i % len(users)],
            sku_id=sku,
            product_id=product,
            quantity=1,
            price_cents=500,
            payment_deadline_ms=now_ms + 900_000,
            reserved_at_ms=now_ms,
        )
        for i in range(n)
    ]


async def write(db: asyncpg.Pool, events: list[OrderEvent]) -> list[str]:
    """The consumer's batch write; the ids it wrote."""
    async with db.acquire() as conn:
        return (await persist(conn, events)).new


async def pay(db: asyncpg.Pool, order_id: str) -> None:
    async with db.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, order_id)
        assert order is not None
        await states.mark_paid(conn, order, SYSTEM, "paid in a test")


async def expire(db: asyncpg.Pool, order_id: str) -> None:
    """The deadline sweeper's step for one order."""
    async with db.acquire() as conn, conn.transaction():
        assert await lifecycle.cancel_order(conn, order_id, reason="payment_timeout")


async def test_counters_follow_every_path_that_writes_orders(
    db: asyncpg.Pool, new_sale: NewSale
) -> None:
    sale = await new_sale(22)
    sale_id = sale[0]
    users = await make_users(db, 10)
    events = events_for(sale, users, 25)

    first = await write(db, events[:15])
    assert await figures(db, sale_id) == {"pending_payment": (15, 0)}
    # 3 of these find no unit left: written, then turned oversold by the same transaction
    assert len(await write(db, events[15:])) == 10
    assert await figures(db, sale_id) == {"pending_payment": (22, 0), "oversold": (3, 0)}
    assert await write(db, events[15:]) == []  # a replay writes nothing, counts nothing
    assert await figures(db, sale_id) == {"pending_payment": (22, 0), "oversold": (3, 0)}

    for oid in first[:6]:
        await pay(db, oid)
    assert await figures(db, sale_id) == {
        "pending_payment": (16, 0),
        "paid": (6, 0),
        "oversold": (3, 0),
    }

    # past the payment deadline: the sweeper cancels them with cancel_reason payment_timeout
    await db.execute(
        "UPDATE orders SET payment_deadline = now() - interval '1 s' WHERE id = ANY($1::text[])",
        first[6:10],
    )
    assert await figures(db, sale_id) == {  # (a deadline is no figure)
        "pending_payment": (16, 0),
        "paid": (6, 0),
        "oversold": (3, 0),
    }
    while await db.fetchval(
        "SELECT count(*) FROM orders WHERE id = ANY($1::text[]) AND status = 'pending_payment'",
        first[6:10],
    ):
        await sweepers.cancel_expired(db, get_metrics())
    assert await figures(db, sale_id) == {
        "pending_payment": (12, 0),
        "paid": (6, 0),
        "cancelled": (4, 4),
        "oversold": (3, 0),
    }

    # the shopper cancels (two UPDATEs: the second changes neither status nor reason)
    for oid in first[10:13]:
        owner = await db.fetchval("SELECT user_id FROM orders WHERE id = $1", oid)
        await states.cancel_order(
            db, oid, Actor(owner, "user"), expected_version=None, reason="changed my mind"
        )
    # a paid order cancelled, its money given back before shipping
    async with db.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, first[0])
        assert order is not None
        await states.cancel_paid(conn, order, SYSTEM, "refunded", version=order["version"])
    expected = {
        "pending_payment": (9, 0),
        "paid": (5, 0),
        "cancelled": (8, 4),
        "oversold": (3, 0),
    }
    assert await figures(db, sale_id) == expected

    # an update that changes no status nor reason writes no counter
    versions = await db.fetch(SQL_COUNTER_VERSIONS, sale_id)
    await db.execute(
        "UPDATE orders SET flash_units_returned = true, updated_at = now() "
        "WHERE flash_sale_id = $1",
        sale_id,
    )
    assert await db.fetch(SQL_COUNTER_VERSIONS, sale_id) == versions
    assert await figures(db, sale_id) == expected

    gone = [*first[13:15], *[e.order_id for e in events[15:]][-1:]]
    statuses = await db.fetch("SELECT status FROM orders WHERE id = ANY($1::text[])", gone)
    assert sorted(r["status"] for r in statuses) == [
        "oversold",
        "pending_payment",
        "pending_payment",
    ]
    async with db.acquire() as conn, conn.transaction():
        for sql in SQL_DELETE_ORDERS:
            await conn.execute(sql, gone)
    assert await figures(db, sale_id) == {**expected, "pending_payment": (7, 0), "oversold": (2, 0)}


async def test_writers_side_by_side_count_every_order_once(
    db: asyncpg.Pool, new_sale: NewSale
) -> None:
    sale = await new_sale(10_000)
    sale_id = sale[0]
    users = await make_users(db, 50)
    early = await write(db, events_for(sale, users, 40))
    batches = [events_for(sale, users, 20) for _ in range(18)]

    async def consumer(mine: list[list[OrderEvent]]) -> int:
        return sum([len(await write(db, batch)) for batch in mine])

    async def payer(ids: list[str]) -> None:
        for oid in ids:
            await pay(db, oid)

    async def sweeper(ids: list[str]) -> None:
        for oid in ids:
            await expire(db, oid)

    # six consumers drain the sale while shoppers pay and the sweeper cancels
    written = await asyncio.gather(
        *(consumer(batches[k::6]) for k in range(6)),
        payer(early[:25]),
        sweeper(early[25:35]),
    )
    assert written[:6] == [60] * 6
    assert await figures(db, sale_id) == {
        "pending_payment": (40 + 360 - 25 - 10, 0),
        "paid": (25, 0),
        "cancelled": (10, 10),
    }


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def test_the_migration_counts_the_orders_already_there(base_settings: Settings) -> None:
    name = "flashsale_counts_" + secrets.token_hex(4)
    admin = await asyncpg.connect(base_settings.database)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(_database(base_settings.database, name))
        try:
            earlier = [m for m in load_migrations() if m.version < "0120"]
            assert await migrate(conn, earlier)
            uid = await conn.fetchval(
                "INSERT INTO users (email, password_hash, nickname) "
                "VALUES ('u@t.local', 'x', 'u') RETURNING id"
            )
            product = await conn.fetchval(
                "INSERT INTO products (merchant_id, name) VALUES ($1, 'p') RETURNING id", uid
            )
            sku = await conn.fetchval(
                "INSERT INTO skus (product_id, price_cents, on_hand) VALUES ($1, 100, 100) "
                "RETURNING id",
                product,
            )
            sales = [await conn.fetchval(SQL_SALE, sku, 50) for _ in range(2)]
            start = datetime.now(UTC) - timedelta(minutes=1)
            rows = [
                (f"o{k}", uid, "flash", status, sales[k % 2], reason, start)
                for k, (status, reason) in enumerate(
                    [("pending_payment", None)] * 5
                    + [("paid", None)] * 3
                    + [("cancelled", "payment_timeout")] * 4
                    + [("cancelled", "by the shopper")] * 2
                )
            ]
            rows.append(("regular", uid, "regular", "paid", None, None, start))
            await conn.executemany(
                "INSERT INTO orders (id, user_id, kind, status, total_cents, pay_cents, "
                "flash_sale_id, cancel_reason, created_at) "
                "VALUES ($1, $2, $3, $4, 100, 100, $5, $6, $7)",
                rows,
            )
            assert (await migrate(conn))[0] == "0120_flash_sale_order_counts"
            for sale_id in sales:
                kept = await conn.fetch(SQL_ORDERS_BY_STATUS, sale_id)
                counted = await conn.fetch(SQL_RECOUNT, sale_id)
                assert sorted(map(tuple, kept)) == sorted(map(tuple, counted))
            assert {
                r["status"]: r["n"] for r in await conn.fetch(SQL_ORDERS_BY_STATUS, sales[0])
            } == {
                "pending_payment": 3,
                "paid": 1,
                "cancelled": 3,
            }
            assert (
                await conn.fetchval(
                    "SELECT sum(expired) FROM flash_sale_order_counts WHERE flash_sale_id = $1",
                    sales[1],
                )
                == 2
            )
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
