"""BASELINE, not the product: the flash sale "the way most teams start".

Same framework (aiohttp + uvloop), same token check (:class:`flashsale.auth.TokenService`)
and the same worker count as the gateway, but every join is ONE PostgreSQL
transaction: ``SELECT stock FOR UPDATE`` on the sale's row, check, ``UPDATE``,
``INSERT`` the order, ``COMMIT``. Every buyer of a hot SKU queues on that one row
lock, which is the point of comparison (scenario 5 of ``loadtests/bench.py``).

It owns its tables (``naive_*``, created at start-up by :func:`setup_schema`, never
by the gateway's migrations) and serves:

- ``POST /api/v1/flash-sales/{id}/join``  -> 202 ``{"data": {"order_id", "status"}}`` or
  409 ``SOLD_OUT``; 401 without a valid token
- ``GET /api/v1/flash-sales/{id}``        -> total/sold/remaining quantity
- ``GET /api/v1/orders/{id}``             -> the caller's order
- ``GET /healthz``

    FLASHSALE_DATABASE_URL=... FLASHSALE_SECRET_KEY=... \\
        python -m loadtests.naive_peer --port 8098 --workers 2 [--create-sale STOCK]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from flashsale.auth import TokenService
from flashsale.errors import AppError, NotFound, SoldOut
from flashsale.settings import Settings
from flashsale.stores.db import create_pool
from stack import run_until_signalled, supervise

SQL_CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS naive_sales (
    id         BIGSERIAL PRIMARY KEY,
    total      INTEGER NOT NULL CHECK (total >= 0),
    stock      INTEGER NOT NULL CHECK (stock >= 0),
    price_cents BIGINT NOT NULL DEFAULT 100
);
CREATE TABLE IF NOT EXISTS naive_orders (
    id         BIGSERIAL PRIMARY KEY,
    sale_id    BIGINT NOT NULL REFERENCES naive_sales (id),
    user_id    BIGINT NOT NULL,
    quantity   INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS naive_orders_sale_idx ON naive_orders (sale_id);
"""
SQL_LOCK_TABLES = "SELECT pg_advisory_xact_lock(7350002)"
SQL_CREATE_SALE = "INSERT INTO naive_sales (total, stock) VALUES ($1, $1) RETURNING id"
SQL_LOCK_STOCK = "SELECT stock FROM naive_sales WHERE id = $1 FOR UPDATE"
SQL_TAKE_STOCK = "UPDATE naive_sales SET stock = stock - $2 WHERE id = $1"
SQL_INSERT_ORDER = (
    "INSERT INTO naive_orders (sale_id, user_id, quantity) VALUES ($1, $2, $3) RETURNING id"
)
SQL_GET_SALE = "SELECT id, total, stock FROM naive_sales WHERE id = $1"
SQL_GET_ORDER = "SELECT id, sale_id, user_id, quantity FROM naive_orders WHERE id = $1"
SQL_COUNT_ORDERS = "SELECT count(*) FROM naive_orders WHERE sale_id = $1"

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("naive_pool", asyncpg.Pool)
TOKENS: web.AppKey[TokenService] = web.AppKey("naive_tokens", TokenService)


async def setup_schema(conn: asyncpg.Connection | PoolConnectionProxy) -> None:
    """Create the baseline's own tables (idempotent, safe against concurrent callers)."""
    async with conn.transaction():
        await conn.execute(SQL_LOCK_TABLES)
        await conn.execute(SQL_CREATE_TABLES)


async def create_sale(conn: asyncpg.Connection | PoolConnectionProxy, stock: int) -> int:
    sale_id: int = await conn.fetchval(SQL_CREATE_SALE, stock)
    return sale_id


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: AppError) -> web.Response:
    return _json(
        {"code": exc.http_status, "message": exc.message, "error": exc.code, "data": None},
        status=exc.http_status,
    )


def _principal_id(request: web.Request) -> int:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        from flashsale.errors import Unauthorized

        raise Unauthorized
    return request.app[TOKENS].verify(token.strip()).user_id


async def join(request: web.Request) -> web.Response:
    try:
        user_id = _principal_id(request)
        sale_id = int(request.match_info["sale_id"])
        body = orjson.loads(await request.read() or b"{}")
        quantity = int(body.get("quantity", 1)) if isinstance(body, dict) else 1
        async with request.app[POOL].acquire() as conn, conn.transaction():
            stock = await conn.fetchval(SQL_LOCK_STOCK, sale_id)
            if stock is None:
                raise NotFound("no such sale")
            if stock < quantity:
                raise SoldOut
            await conn.execute(SQL_TAKE_STOCK, sale_id, quantity)
            order_id = await conn.fetchval(SQL_INSERT_ORDER, sale_id, user_id, quantity)
    except AppError as exc:
        return _error(exc)
    return _json(
        {"code": 202, "message": "ok", "data": {"order_id": str(order_id), "status": "created"}},
        status=202,
    )


async def get_sale(request: web.Request) -> web.Response:
    row = await request.app[POOL].fetchrow(SQL_GET_SALE, int(request.match_info["sale_id"]))
    if row is None:
        return _error(NotFound("no such sale"))
    total, stock = row["total"], row["stock"]
    return _json(
        {
            "data": {
                "flash_sale_id": row["id"],
                "total_quantity": total,
                "sold_quantity": total - stock,
                "remaining_quantity": stock,
                "status": "active" if stock > 0 else "sold_out",
            }
        }
    )


async def get_order(request: web.Request) -> web.Response:
    try:
        user_id = _principal_id(request)
    except AppError as exc:
        return _error(exc)
    order_id = request.match_info["order_id"]
    row = (
        await request.app[POOL].fetchrow(SQL_GET_ORDER, int(order_id))
        if order_id.isdigit()
        else None
    )
    if row is None or row["user_id"] != user_id:
        return _error(NotFound("no such order"))
    return _json(
        {
            "data": {
                "order_id": str(row["id"]),
                "status": "created",
                "flash_sale_id": row["sale_id"],
                "quantity": row["quantity"],
            }
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"data": {"status": "alive"}})


def create_app(settings: Settings) -> web.Application:
    """The baseline app; its pool is sized like the gateway's (``db_pool_max``)."""
    app = web.Application()
    app[TOKENS] = TokenService(settings.secret, settings.token_ttl_s)

    async def pool_ctx(app: web.Application) -> Any:
        app[POOL] = await create_pool(settings.database, min_size=1, max_size=settings.db_pool_max)
        yield
        await app[POOL].close()

    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/api/v1/flash-sales/{sale_id:\\d+}/join", join)
    app.router.add_get("/api/v1/flash-sales/{sale_id:\\d+}", get_sale)
    app.router.add_get("/api/v1/orders/{order_id}", get_order)
    app.router.add_get("/healthz", healthz)
    return app


async def _prepare(settings: Settings, stock: int | None) -> int | None:
    conn = await asyncpg.connect(settings.database)
    try:
        await setup_schema(conn)
        return None if stock is None else await create_sale(conn, stock)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="BASELINE naive flash sale (one PG tx per join)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--create-sale",
        type=int,
        metavar="STOCK",
        help="create a sale with this stock and print its id first",
    )
    p.add_argument("--worker", action="store_true", help="run one worker in this process")
    args = p.parse_args(argv)
    settings = Settings.from_env().require("database_url", "secret_key")
    import uvloop

    if args.worker:
        uvloop.run(run_until_signalled(create_app(settings), "127.0.0.1", args.port))
        return 0
    sale_id = asyncio.run(_prepare(settings, args.create_sale))
    if sale_id is not None:
        print(f"sale_id={sale_id}", flush=True)
    return supervise(
        [sys.executable, "-m", "loadtests.naive_peer", "--port", str(args.port), "--worker"],
        dict(os.environ),
        args.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
