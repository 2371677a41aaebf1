"""A store taken away under the storefront: a real PostgreSQL of the test's own is killed
(SIGKILL, its backends with it) while shoppers browse and fill carts, then started again
on the same data folder (crash recovery: "the database system is starting up").

What the shopper may be told meanwhile is a retriable 503 ``RETRY_LATER`` with
``Retry-After`` — never a 500 — and the storefront answers by itself once the database is
back.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from flashsale import plans
from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores.db import lost_database
from gateway.app import create_app
from gateway.plans_runtime import SWITCHES
from stack.embedded import start_postgres, start_redis
from tests.faultkit import kill_postgres, own_shop, when
from tests.flashkit import GatewayServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Client = TestClient[Any, Any]


@pytest.fixture
async def root() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flashsale-storeloss-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Browsing:
    """Shoppers going round the storefront (catalog and cart), every answer counted."""

    def __init__(self, client: Client, product: int, sku: int, bearer: dict[str, str]) -> None:
        self.client = client
        self.statuses: Counter[str] = Counter()
        self.unexplained: list[str] = []  # a 503 without Retry-After, a 500, a wrong code
        self.stop = asyncio.Event()
        self.steps: list[Callable[[], Awaitable[Any]]] = [
            lambda: client.get("/api/v1/products"),
            lambda: client.get(f"/api/v1/products/{product}"),
            lambda: client.get("/api/v1/categories"),
            lambda: client.post(
                "/api/v1/cart/items", json={"sku_id": sku, "quantity": 1}, headers=bearer
            ),
            lambda: client.get("/api/v1/cart", headers=bearer),
            lambda: client.post("/api/v1/cart/items", json={"sku_id": sku, "quantity": 1}),
        ]

    def total(self) -> int:
        return sum(self.statuses.values())

    def ok_since(self, mark: int) -> int:
        return self.statuses["200"] - mark

    async def shopper(self) -> None:
        i = 0
        while not self.stop.is_set():
            step = self.steps[i % len(self.steps)]
            i += 1
            try:
                resp = await step()
                body = await resp.json(content_type=None)
            except aiohttp.ClientError as exc:
                self.statuses["disconnected"] += 1
                self.unexplained.append(f"connection error {exc!r}")
                continue
            stale = resp.status == 200 and body.get("stale") is True
            self.statuses[str(resp.status) + (" stale" if stale else "")] += 1
            if resp.status == 503:
                if body.get("error") != "RETRY_LATER" or "Retry-After" not in resp.headers:
                    self.unexplained.append(f"503 {body} {dict(resp.headers)}")
                await asyncio.sleep(0.05)
            elif resp.status != 200:
                self.unexplained.append(f"{resp.status} {body}")


async def test_postgres_killed_mid_browse_answers_503_with_retry_after(
    base_settings: Settings, tokens: TokenService, root: Path
) -> None:
    pg, product, sku, uid = await own_shop(root)
    settings = base_settings.with_(database_url=pg.url, db_pool_min=1, db_pool_max=4)
    app = create_app(settings)
    try:
        async with TestClient(GatewayServer(app)) as client:
            browsing = Browsing(
                client, product, sku, {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"}
            )
            shoppers = [asyncio.create_task(browsing.shopper()) for _ in range(6)]
            try:
                await when(lambda: browsing.statuses["200"] >= 60)
                kill_postgres(pg)
                await when(lambda: browsing.total() - browsing.statuses["200"] >= 30)
                before_restart = browsing.total()
                pg = start_postgres(root / "pg", port=pg.port, durable=True)
                mark = browsing.statuses["200"]
                await when(lambda: browsing.ok_since(mark) >= 60)
            finally:
                browsing.stop.set()
                await asyncio.gather(*shoppers)
            print("answers:", dict(browsing.statuses), "before the restart:", before_restart)
            assert browsing.statuses["500"] == 0, browsing.unexplained[:5]
            assert not browsing.unexplained, browsing.unexplained[:5]
    finally:
        pg.stop()


async def test_catalog_from_cache_arms_itself_while_postgres_is_gone(
    base_settings: Settings, tokens: TokenService, root: Path
) -> None:
    """Armed, the plan switches itself on when PostgreSQL dies: catalog pages are answered
    from their copies (marked stale), carts 503 with Retry-After, no 500; it switches
    itself back when PostgreSQL is back, and the operation log has both moves."""
    pg, product, sku, uid = await own_shop(root)
    redis_server = start_redis(root / "redis")
    settings = base_settings.with_(
        database_url=pg.url,
        redis_url=redis_server.url,
        db_pool_min=1,
        db_pool_max=4,
        plan_arm_after_s=1.0,
        plan_disarm_after_s=1.0,
    )
    app = create_app(settings)
    admin = {"Authorization": f"Bearer {tokens.issue(1, 'admin')}"}
    try:
        async with TestClient(GatewayServer(app)) as client:
            armed = await client.put(
                "/api/v1/admin/plans/catalog-from-cache",
                json={"mode": "armed", "confirm": "catalog-from-cache"},
                headers=admin,
            )
            assert armed.status == 200, await armed.text()
            browsing = Browsing(
                client, product, sku, {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"}
            )
            switches = app[SWITCHES]
            shoppers = [asyncio.create_task(browsing.shopper()) for _ in range(4)]
            try:
                await when(lambda: browsing.statuses["200"] >= 60)  # the copies are kept
                kill_postgres(pg)
                await when(lambda: switches.catalog_from_cache)
                await when(lambda: browsing.statuses["200 stale"] >= 30)
                await when(lambda: browsing.statuses["503"] >= 10)
                pg = start_postgres(root / "pg", port=pg.port, durable=True)
                await when(lambda: not switches.catalog_from_cache)
                mark = browsing.statuses["200"]
                await when(lambda: browsing.ok_since(mark) >= 30)
            finally:
                browsing.stop.set()
                await asyncio.gather(*shoppers)
            print("answers:", dict(browsing.statuses))
            assert browsing.statuses["500"] == 0, browsing.unexplained[:5]
            assert not browsing.unexplained, browsing.unexplained[:5]
            state = switches.states[plans.CATALOG_FROM_CACHE]
            assert state.mode == plans.ARMED and not state.auto
            listed = await client.get("/api/v1/admin/plans", headers=admin)
            log = (await listed.json())["data"]["log"]
            moves = [(e["from"], e["to"], e["by"], e["auto"]) for e in reversed(log)]
            assert moves == [
                ("off", "armed", "admin:1", False),
                ("armed", "on", "auto", True),
                ("on", "armed", "auto", True),
            ]
    finally:
        pg.stop()
        redis_server.stop()


@pytest.mark.unit
def test_only_asyncpg_reaching_for_the_server_is_a_lost_database() -> None:
    def raised(exc: Exception) -> Exception:
        try:
            raise exc
        except Exception as caught:
            return caught

    assert lost_database(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert lost_database(asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    assert lost_database(asyncpg.exceptions.TooManyConnectionsError("full"))
    # the same classes raised by our code, and a wrong request, are not an outage
    assert not lost_database(raised(OSError("ours")))
    assert not lost_database(raised(TimeoutError()))
    assert not lost_database(asyncpg.UniqueViolationError("dup"))
    assert not lost_database(asyncpg.DataError("bad value"))
