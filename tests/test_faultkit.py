"""The fault verdicts' own evidence: ``settle_and_judge`` holds convergence itself (every
accepted order in PostgreSQL, nothing in flight, reconcile clean, sold = the units of the
live orders) and a store that does not converge within the bound fails with its state,
never a verdict taken anyway."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from flashsale.auth import TokenService
from tests.conftest import auth
from tests.faultkit import Answers, settle_and_judge
from tests.flashkit import admin_headers, create_sale, forget_sale, join_final, make_sku, make_users

pytestmark = [pytest.mark.integration]


async def test_a_store_that_does_not_converge_fails_the_verdict_with_its_state(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    redis: Redis,
    tokens: TokenService,
    consumer: None,
) -> None:
    admin = await admin_headers(db, tokens)
    sale_id = await create_sale(client, admin, await make_sku(db, on_hand=10), quantity=10)
    (user,) = await make_users(db, 1)
    try:
        status, _, order_id = await join_final(client, sale_id, auth(tokens, user))
        assert status == 202 and order_id is not None
        answers = Answers(accepted={user: order_id})
        verdict = await settle_and_judge("control", db, redis, sale_id, answers, time.monotonic())
        assert (verdict.persisted, verdict.sold, verdict.live_units) == (1, 1, 1)

        # an order a shopper was told about that PostgreSQL never got
        told = Answers(accepted={user: order_id, user + 1: "never-written"})
        with pytest.raises(AssertionError, match=r"within 1s.*accepted not in PostgreSQL: 1 "):
            await settle_and_judge("lost", db, redis, sale_id, told, time.monotonic(), timeout_s=1)

        # the sale's counter off its orders: reconcile counts orders and stays clean, the
        # verdict compares the two
        sql = "UPDATE flash_sales SET sold_quantity = sold_quantity + $2 WHERE id = $1"
        await db.execute(sql, sale_id, 1)
        with pytest.raises(AssertionError, match="sold_quantity=2 vs live order units=1"):
            await settle_and_judge(
                "drift", db, redis, sale_id, answers, time.monotonic(), timeout_s=1
            )
        await db.execute(sql, sale_id, -1)
    finally:
        await forget_sale(db, redis, sale_id)
