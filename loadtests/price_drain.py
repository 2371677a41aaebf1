"""What one persisted flash order costs PostgreSQL, statement by statement and index by index.

    python -m loadtests.price_drain [--batches 5] [--batch 2000]

Starts a PostgreSQL of its own (the bench's settings, plus ``pg_stat_statements`` with
``track = all`` so that the statements triggers run are priced too), migrates it, makes
users with a default address, a merchant's product, a SKU and a sale, and writes batches
of order events with the consumer's own :func:`consumers.order_events.persist`. It
prints, per order: the backend's CPU (``/proc``), the WAL, each statement's share of
both, and (``pg_walinspect``) the WAL of each table and index by record type — what
every index, trigger and foreign-key check costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from consumers.order_events import persist
from flashsale.flash.events import OrderEvent
from flashsale.stores.db import init_connection, migrate
from loadtests import mint
from stack import restart_server, start_stack

TABLES = ("orders", "order_items", "inventory_ledger", "merchant_orders")
SQL_SALE = """
INSERT INTO flash_sales (sku_id, product_id, flash_price_cents, quantity, per_user_limit,
                         start_at, end_at, payment_window_s)
VALUES ($1, $2, 100, 1000000000, 1000, now(), now() + interval '1 day', 900) RETURNING id
"""
# Each WAL record charged to the first block it changes (an index insert changes one).
SQL_WAL_BY_RELATION = """
SELECT coalesce(pg_filenode_relation(reltablespace, relfilenode)::regclass::text,
                relfilenode::text) AS relation,
       record_type, count(*) AS records, sum(record_length) AS bytes
FROM pg_get_wal_block_info($1, $2)
WHERE block_id = 0
GROUP BY 1, 2 ORDER BY 4 DESC
"""
SQL_STATEMENTS = """
SELECT calls, total_exec_time, wal_bytes, wal_records, query
FROM pg_stat_statements
WHERE query NOT ILIKE '%pg_stat_statements%' AND query NOT ILIKE '%pg_current_wal_insert_lsn%'
ORDER BY total_exec_time DESC
"""


def _backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Where WAL is inserted, not where it was written: the server runs with synchronous_commit
# off, so the write position may not have reached the last batch's records yet (a batch of
# five went missing about half the time).
async def _wal(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')"))


class Fixture:
    def __init__(self, conn: asyncpg.Connection, users: list[int], sku: int, product: int):
        self.conn = conn
        self.users = users
        self.sku = sku
        self.product = product
        self.next_id = int(time.time()) * 10_000_000

    async def events(self, count: int) -> list[OrderEvent]:
        sale = await self.conn.fetchval(SQL_SALE, self.sku, self.product)
        now_ms = int(time.time() * 1000)
        out = []
        for n in range(count):
            self.next_id += 1
            out.append(
                OrderEvent(
                    order_id=str(self.next_id),
                    sale_id=sale,
                    user_id=self.users[n % len(self.users)],
                    sku_id=self.sku,
                    product_id=self.product,
                    quantity=1,
                    price_cents=100,
                    payment_deadline_ms=now_ms + 900_000,
                    reserved_at_ms=now_ms,
                )
            )
        return out


async def _measure(fx: Fixture, batches: int, batch: int) -> tuple[float, float]:
    """(backend CPU µs, WAL bytes) per order over ``batches`` persisted batches."""
    conn = fx.conn
    pid = conn.get_server_pid()
    todo = [await fx.events(batch) for _ in range(batches)]
    wal, cpu = await _wal(conn), _backend_cpu_s(pid)
    for events in todo:
        written = await persist(conn, events)
        assert len(written.new) == len(events), "every order in the batch is new"
    n = batches * batch
    return (_backend_cpu_s(pid) - cpu) * 1e6 / n, (await _wal(conn) - wal) / n


async def run(dsn: str, batches: int, batch: int) -> None:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)  # the pool's JSON codecs, as the consumer has them
    try:
        await migrate(conn)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        users = await mint.insert_users(conn, 5000)
        (merchant,) = await mint.insert_users(conn, 1, "merchant")
        product = await conn.fetchval(
            "INSERT INTO products (merchant_id, name) VALUES ($1, 'p') RETURNING id", merchant
        )
        sku = await conn.fetchval(
            "INSERT INTO skus (product_id, code, price_cents, on_hand) "
            "VALUES ($1, 'S-1', 10000, 2000000000) RETURNING id",
            product,
        )
        fx = Fixture(conn, users, sku, product)
        await _measure(fx, 2, batch)  # warm: caches, plans, the snapshot row
        await conn.execute("CHECKPOINT")
        await conn.execute("SELECT pg_stat_statements_reset()")
        before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
        cpu, wal = await _measure(fx, batches, batch)
        window = (before, await conn.fetchval("SELECT pg_current_wal_insert_lsn()"))
        n = batches * batch
        print(f"all: backend CPU {cpu:.1f} µs/order, WAL {wal:.0f} B/order ({n} orders)")
        print(f"{'µs/order':>9} {'WAL B/order':>11} {'records':>8} {'calls':>6}  statement")
        for r in await conn.fetch(SQL_STATEMENTS):
            query = " ".join(r["query"].split())[:90]
            print(
                f"{r['total_exec_time'] * 1000 / n:9.1f} {float(r['wal_bytes']) / n:11.0f} "
                f"{r['wal_records'] / n:8.2f} {r['calls']:6d}  {query}"
            )
        # pg_walinspect reads flushed WAL only: a commit waited for flushes all before it
        await conn.execute("SET synchronous_commit = on")
        await conn.execute("SELECT txid_current()")
        print(f"{'WAL B/order':>11} {'records':>8}  relation: record type")
        for r in await conn.fetch(SQL_WAL_BY_RELATION, window[0], window[1]):
            print(
                f"{float(r['bytes']) / n:11.0f} {r['records'] / n:8.2f}  "
                f"{r['relation']}: {r['record_type']}"
            )
    finally:
        await conn.close()


def main(batches: int, batch: int) -> int:
    root = Path(tempfile.mkdtemp(prefix="flashsale-price-drain-"))
    stack = start_stack(root, redis=False, kafka=False, durable=False)
    try:

        async def preload() -> None:
            conn = await asyncpg.connect(stack.url("postgres"))
            try:
                await conn.execute(
                    "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
                )
                await conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            finally:
                await conn.close()

        asyncio.run(preload())
        restart_server(stack, "postgres", durable=False)
        dsn = stack.url("postgres")
        assert dsn is not None
        asyncio.run(run(dsn, batches, batch))
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.price_drain")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    return main(args.batches, args.batch)


if __name__ == "__main__":
    sys.exit(_cli())
