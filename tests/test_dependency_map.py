"""The dependency map (gateway/dependencies.py) held against the service: with every
store up, each route is called once; then one store — a real process of the test's own —
is killed and each route is called again. For every route:

- never a 500;
- a store the map says the route does not need changes nothing: the same status;
- a store it needs strongly turns an answer that reached the store into a 503 (a refusal
  made before any store, 4xx on the input or the token, stays what it was);
- a store it needs weakly gives the same answer or a 503, never anything else.

And docs/plans.md carries the map as the code states it.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores.db import create_pool
from gateway import dependencies
from gateway.app import all_routes, create_app
from gateway.routing import ROUTE_TABLE, Route
from stack.embedded import Server, start_kafka, start_redis
from tests.faultkit import kill_postgres, own_shop
from tests.flashkit import GatewayServer, create_sale

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Client = TestClient[Any, Any]
REPO = Path(__file__).resolve().parent.parent
# refused on the request itself, before any store is asked
BEFORE_ANY_STORE = {400, 401, 403, 405, 413, 415, 422}


@pytest.fixture
async def root() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flashsale-depmap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


GUEST_CART = "guest-cart-of-the-dependency-map"
MISSING = "999999"  # an id of nothing: writes through any route change nothing


def _path(r: Route, sale_id: int) -> str:
    if not r.path.endswith("/close"):  # the sale stays open for the joins
        out = r.path.replace("{sale_id}", str(sale_id))
    out = r.path.replace("{sale_id}", MISSING) if r.path.endswith("/close") else out
    out = out.replace("{name}", "read-only")
    for param in ("id", "user_id", "order_id", "item_id", "address_id", "return_id"):
        out = out.replace("{" + param + "}", MISSING)
    return out.replace("{payment_id}", "P1").replace("{admission}", "x")


async def call_every_route(
    client: Client, routes: list[Route], sale_id: int, headers: dict[str, dict[str, str]]
) -> dict[tuple[str, str], tuple[int, str]]:
    """(status, error code) of each route called once with what a caller of its kind sends."""
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for r in routes:
        path = _path(r, sale_id)
        if r.path.endswith("/auth/logout"):
            hdrs = headers["leaving"]  # logging out revokes that user's tokens
        else:
            hdrs = headers.get(r.auth or "", {})
        hdrs = {**hdrs, "X-Cart-Token": GUEST_CART}  # a guest cart to read, merge, fill
        body: Any = None
        if r.body is not None:
            body = {"quantity": 1} if "/join" in r.path else {}
        if "/join" in r.path:
            hdrs = {**hdrs, "Idempotency-Key": secrets.token_hex(8)}
        async with asyncio.timeout(30):
            resp = await client.request(r.method, path, json=body, headers=hdrs)
            code = ""
            if resp.status >= 400 and resp.content_type == "application/json":
                code = (await resp.json()).get("error", "")
            resp.close()  # an event stream: the status is the answer
        out[(r.method, r.path)] = (resp.status, code)
    return out


def judge(
    store: str,
    routes: list[Route],
    up: dict[tuple[str, str], tuple[int, str]],
    down: dict[tuple[str, str], tuple[int, str]],
) -> list[str]:
    wrong = []
    for r in routes:
        key = (r.method, r.path)
        need = dependencies.route_needs(r)[store]
        (before, _), (after, code) = up[key], down[key]
        where = f"{r.method} {r.path} ({store} {need.need}): {before} -> {after} {code}"
        if after == 500:
            wrong.append("500: " + where)
        elif need.need == dependencies.NONE and after != before:
            wrong.append("not in the map: " + where)
        elif need.need == dependencies.STRONG and before not in BEFORE_ANY_STORE:
            if after != 503:
                wrong.append("strong, yet answered: " + where)
        elif need.need == dependencies.WEAK and after not in (before, 503):
            wrong.append("weak, neither the same nor 503: " + where)
    return wrong


@pytest.mark.parametrize("store", dependencies.STORES)
async def test_every_route_answers_as_the_map_says_when_a_store_is_killed(
    store: str, base_settings: Settings, tokens: TokenService, root: Path
) -> None:
    pg, _, sku, uid = await own_shop(root)
    redis_server = start_redis(root / "redis")
    kafka_server = start_kafka(root / "kafka")
    servers: dict[str, Server] = {"postgres": pg, "redis": redis_server, "kafka": kafka_server}
    pool = await create_pool(pg.url, min_size=1, max_size=2)
    leaving, leaving_too, admin = [
        await pool.fetchval(
            "INSERT INTO users (email, password_hash, nickname, role) "
            "VALUES ($1, 'x', 'n', $2) RETURNING id",
            f"{role}-{secrets.token_hex(5)}@test.local",
            role,
        )
        for role in ("user", "user", "admin")
    ]
    await pool.close()
    settings = base_settings.with_(
        database_url=pg.url,
        redis_url=redis_server.url,
        kafka_bootstrap=kafka_server.url,
        kafka_produce_timeout_ms=1000,
        revocation_reload_ms=200,
        revocation_max_stale_s=1,
        db_pool_min=1,
        db_pool_max=4,
    )
    headers = {
        "user": {"Authorization": f"Bearer {tokens.issue(uid, 'user')}"},
        "merchant": {"Authorization": f"Bearer {tokens.issue(admin, 'admin')}"},
        "merchant-only": {"Authorization": f"Bearer {tokens.issue(admin, 'admin')}"},
        "admin": {"Authorization": f"Bearer {tokens.issue(admin, 'admin')}"},
        "leaving": {"Authorization": f"Bearer {tokens.issue(leaving, 'user')}"},
    }
    app = create_app(settings)
    try:
        async with TestClient(GatewayServer(app)) as client:
            sale_id = await create_sale(client, headers["admin"], sku, limit=10)
            routes: list[Route] = app[ROUTE_TABLE]
            up = await call_every_route(client, routes, sale_id, headers)
            assert up[("POST", "/api/v1/flash-sales/{sale_id}/join")][0] == 202, up[
                ("POST", "/api/v1/flash-sales/{sale_id}/join")
            ]
            killed = servers[store]
            if store == "postgres":
                kill_postgres(killed)
            else:
                killed.proc.send_signal(signal.SIGKILL)
                killed.proc.wait(10)
            # past the revocation list's staleness: what a token route does with Redis gone
            await asyncio.sleep(settings.revocation_max_stale_s + 0.5)
            headers["leaving"] = {"Authorization": f"Bearer {tokens.issue(leaving_too, 'user')}"}
            down = await call_every_route(client, routes, sale_id, headers)
        changed = {f"{m} {p}": (up[(m, p)], a) for (m, p), a in down.items() if a != up[(m, p)]}
        print(f"{store} killed: {len(changed)} of {len(routes)} routes answer otherwise:", changed)
        wrong = judge(store, routes, up, down)
        assert not wrong, "\n".join(wrong)
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.unit
def test_docs_carry_the_map_as_the_code_states_it() -> None:
    settings = Settings.from_env({}).with_(payment_provider="sandbox")
    table = dependencies.markdown(all_routes(settings))
    doc = (REPO / "docs" / "plans.md").read_text(encoding="utf-8")
    assert table in doc, "docs/plans.md: paste gateway.dependencies.markdown(all_routes())"
