"""Helpers for the storefront tests: catalog rows straight in SQL, an order via the API."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg
from aiohttp.test_utils import TestClient

from flashsale.auth import TokenService
from tests.conftest import auth, make_user

ADDRESS = {"name": "Zhang San", "phone": "13800138000", "address": "1 Test Road"}


async def make_product(
    db: asyncpg.Pool, merchant_id: int, skus: list[tuple[int, int]]
) -> tuple[int, list[int]]:
    """A product on sale with SKUs given as (price_cents, on_hand)."""
    pid: int = await db.fetchval(
        "INSERT INTO products (merchant_id, name, description) VALUES ($1, $2, 'd') RETURNING id",
        merchant_id,
        "product-" + secrets.token_hex(4),
    )
    sku_ids = [
        await db.fetchval(
            "INSERT INTO skus (product_id, code, price_cents, on_hand) VALUES ($1, $2, $3, $4) "
            "RETURNING id",
            pid,
            secrets.token_hex(4),
            price,
            on_hand,
        )
        for price, on_hand in skus
    ]
    return pid, sku_ids


async def sku_row(db: asyncpg.Pool, sku_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT on_hand, reserved, sold FROM skus WHERE id = $1", sku_id)
    assert row is not None
    return dict(row)


async def place_order(
    client: TestClient[Any, Any],
    tokens: TokenService,
    user_id: int,
    sku_id: int,
    quantity: int = 1,
    **extra: Any,
) -> tuple[int, dict[str, Any]]:
    body = {
        "items": [{"sku_id": sku_id, "quantity": quantity}],
        "shipping_address": ADDRESS,
        **extra,
    }
    resp = await client.post("/api/v1/orders", json=body, headers=auth(tokens, user_id))
    return resp.status, await resp.json()


async def pay_via_sandbox(
    client: TestClient[Any, Any], tokens: TokenService, user_id: int, payment_id: str
) -> dict[str, Any]:
    resp = await client.post(
        f"/api/v1/payment/sandbox/{payment_id}/approve", headers=auth(tokens, user_id)
    )
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


async def make_category(db: asyncpg.Pool, parent_id: int | None = None) -> int:
    cid: int = await db.fetchval(
        "INSERT INTO categories (name, parent_id) VALUES ($1, $2) RETURNING id",
        f"cat-{secrets.token_hex(5)}",
        parent_id,
    )
    return cid


async def make_listed_product(
    db: asyncpg.Pool,
    *,
    price: int = 1_000,
    on_hand: int = 10,
    category_id: int | None = None,
    skus: int = 1,
    status: str = "on_sale",
    name: str = "Widget",
) -> tuple[int, list[int]]:
    """A product (of a fresh merchant) with ``skus`` SKUs of ``price`` cents each."""
    merchant = await make_user(db, "merchant")
    if category_id is None:
        category_id = await make_category(db)
    pid: int = await db.fetchval(
        "INSERT INTO products (merchant_id, category_id, name, images, status) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING id",
        merchant,
        category_id,
        name,
        ["https://img.test/w.jpg"],
        status,
    )
    sku_ids = [
        await db.fetchval(
            "INSERT INTO skus (product_id, attributes, price_cents, on_hand) "
            "VALUES ($1, $2, $3, $4) RETURNING id",
            pid,
            {"size": f"s{i}"},
            price,
            on_hand,
        )
        for i in range(skus)
    ]
    return pid, sku_ids


@asynccontextmanager
async def connection(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection typed as the Connection that the coupon interface takes."""
    async with db.acquire() as conn:
        yield cast(asyncpg.Connection, conn)
