"""Schemathesis against the live gateway: no 5xx, and every answer as the document says.

The app under test runs on a real port in a thread of its own, with its own
database, Redis database and topics on the session's servers, so nothing the
fuzzer creates (admin promotions, coupons, sales) can reach another test's data.
Each operation gets a bounded number of cases, about half of them with real ids
(a product, SKU, flash sale, order, payment, cart item, presale, preorder) so
they get past the 404, sent with the token of the role the operation needs.

Checks: not_a_server_error, status_code_conformance, content_type_conformance
and response_schema_conformance for every case; and for schema-valid cases, no
400 and no VALIDATION_FAILED beyond the cross-field rules an operation declares.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import requests
import schemathesis
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from flashsale.auth import TokenService
from flashsale.settings import Settings
from flashsale.stores.db import create_pool, migrate
from gateway.app import create_app
from gateway.routes import extra_routes, health, users
from gateway.routes.payments import SANDBOX_ROUTES
from gateway.routing import Route, path_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_EXAMPLES = 24
# the live app pays with the sandbox provider (tests/conftest.py), so its routes are served
ALL_ROUTES: list[Route] = [*health.ROUTES, *users.ROUTES, *extra_routes(), *SANDBOX_ROUTES]
# Rules across fields the document cannot state: a schema-valid request may fail only these.
RULE_FIELDS: dict[tuple[str, str], set[str]] = {
    ("GET", "/api/v1/products"): {"price_max"},
    ("POST", "/api/v1/products"): {"category_id"},  # a category that does not exist
    ("PUT", "/api/v1/products/{id}"): {"category_id", "skus[].id"},  # a SKU of another product
    # the product has several SKUs (a fuzzed PUT /products/{id} may have added some)
    ("POST", "/api/v1/products/{id}/reserve"): {"sku_id"},
    ("POST", "/api/v1/admin/flash-sales"): {"end_at", "buckets"},  # a queued sale has one
    ("PATCH", "/api/v1/admin/flash-sales/{sale_id}"): {"end_at"},
    ("POST", "/api/v1/presales"): {"ends_at", "sku_id"},  # a SKU that does not exist
    ("POST", "/api/v1/orders"): {"items[].sku_id"},  # a product with several SKUs
    ("POST", "/api/v1/cart/checkout/preview"): {"selected_items"},  # none in the cart
    ("POST", "/api/v1/cart/checkout"): {"selected_items"},
    ("POST", "/api/v1/admin/coupons"): {
        "valid_until",
        "amount_off",
        "percent_off",
        "category_ids",
        "product_ids",
    },
    ("POST", "/api/v1/admin/promotions"): {"valid_until", "rules", "rules[].discount_amount"},
    # lines the order does not hold, more than is left to return, items on a money-only refund
    ("POST", "/api/v1/orders/{id}/returns"): {"items", "items[].sku_id", "items[].quantity"},
    ("PUT", "/api/v1/admin/plans/{name}"): {"confirm"},  # must repeat the plan's name
}
# The headers the service reads (and one it does not), sent with bytes that are not UTF-8
# (or not ASCII): aiohttp hands such bytes over as lone surrogates, which no encoder takes.
READ_HEADERS = (
    "X-Request-ID",
    "Idempotency-Key",
    "X-Device-Id",
    "X-Join-Token",
    "X-Cart-Token",
    "X-Forwarded-For",
    "Authorization",
    "X-Not-Read",
)
ODD_BYTES = (b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\x80", b"\xed\xa0\x80", b"\xf5\x80", b"\xc3\xa9")
# visible ASCII around them (a header value neither starts nor ends with a blank, and the
# HTTP parser refuses control characters before the app could see them)
_VISIBLE = st.binary(max_size=12).map(lambda raw: bytes(0x21 + b % 94 for b in raw))
ODD_HEADERS = st.dictionaries(
    st.sampled_from(READ_HEADERS),
    st.builds(lambda a, odd, b: a + odd + b, _VISIBLE, st.sampled_from(ODD_BYTES), _VISIBLE),
    min_size=1,
    max_size=3,
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class Live:
    base_url: str
    headers: dict[str, dict[str, str]]  # role -> Authorization header
    ids: dict[str, dict[str, Any]]  # path template -> real path parameters
    schema: Any


class _Server:
    """The app on 127.0.0.1:<free port>, served by a loop in a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> None:
        self.app = create_app(self.settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        if self.runner is not None:
            self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@pytest.fixture(scope="module")
async def own_settings(base_settings: Settings) -> AsyncIterator[Settings]:
    dbname = "flashsale_fuzz_" + secrets.token_hex(4)
    admin_url = base_settings.database
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    suffix = secrets.token_hex(3)
    settings = base_settings.with_(
        database_url=_with_db(admin_url, dbname),
        redis_url=_with_db(base_settings.redis, "7"),
        kafka_orders_topic=f"fuzz.orders.{suffix}",
        kafka_dlq_topic=f"fuzz.orders.dlq.{suffix}",
        kafka_consumer_group=f"fuzz-group-{suffix}",
    )
    pool = await create_pool(settings.database, min_size=1, max_size=1)
    async with pool.acquire() as conn:
        await migrate(conn)
    await pool.close()
    yield settings
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    await admin.close()


def _post(base: str, path: str, headers: dict[str, str], body: dict[str, Any]) -> Any:
    resp = requests.post(base + path, json=body, headers=headers, timeout=30)
    assert resp.status_code in (200, 201, 202), (path, resp.text)
    return resp.json()["data"]


def _returned_order(
    base: str, shopper: dict[str, str], merchant: dict[str, str], sku: int, address: Any
) -> dict[str, Any]:
    """A shipped order with a return request waiting for a decision."""
    order = _post(
        base,
        "/api/v1/orders",
        shopper,
        {"items": [{"sku_id": sku, "quantity": 2}], "shipping_address": address},
    )
    oid = order["order_id"]
    _post(base, f"/api/v1/payment/sandbox/{order['payment_id']}/approve", shopper, {})
    _post(
        base,
        f"/api/v1/orders/{oid}/ship",
        merchant,
        {"shipping_company": "SF", "tracking_number": "SF1"},
    )
    ret = _post(
        base,
        f"/api/v1/orders/{oid}/returns",
        shopper,
        {"kind": "return", "reason": "fuzz", "items": [{"sku_id": sku, "quantity": 1}]},
    )
    return {"order_id": oid, "return_id": ret["return_id"]}


async def _users(settings: Settings) -> dict[str, int]:
    conn = await asyncpg.connect(settings.database)
    try:
        out = {}
        # "victim": the account the admin routes change and disable (never one whose
        # token the fuzzer uses, or every later case would be TOKEN_REVOKED)
        for name, role in (
            ("user", "user"),
            ("merchant", "merchant"),
            ("admin", "admin"),
            ("victim", "user"),
        ):
            out[name] = await conn.fetchval(
                "INSERT INTO users (email, password_hash, nickname, role) "
                "VALUES ($1, 'x', 'fuzz', $2) RETURNING id",
                f"fuzz-{name}-{secrets.token_hex(4)}@test.local",
                role,
            )
        return out
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def live(own_settings: Settings) -> Iterator[Live]:
    server = _Server(own_settings)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        tokens = TokenService(own_settings.secret, own_settings.token_ttl_s)
        uids = server.run(_users(own_settings))
        victim = uids.pop("victim")
        headers = {
            role: {"Authorization": f"Bearer {tokens.issue(uid, role)}"}
            for role, uid in uids.items()
        }
        shopper, merchant, admin = headers["user"], headers["merchant"], headers["admin"]
        now = datetime.now(UTC)
        product = _post(
            base,
            "/api/v1/products",
            merchant,
            {"name": "fuzz phone", "skus": [{"price": 1000, "stock": 100_000}]},
        )
        pid, sku = product["id"], product["skus"][0]["id"]
        sale = _post(
            base,
            "/api/v1/admin/flash-sales",
            admin,
            {
                "sku_id": sku,
                "flash_price": 500,
                "quantity": 1000,
                "per_user_limit": 5,
                "start_at": (now - timedelta(minutes=1)).isoformat(),
                "end_at": (now + timedelta(days=1)).isoformat(),
            },
        )
        queued = _post(
            base,
            "/api/v1/admin/flash-sales",
            admin,
            {
                "sku_id": sku,
                "flash_price": 500,
                "quantity": 1000,
                "per_user_limit": 5,
                "start_at": (now - timedelta(minutes=1)).isoformat(),
                "end_at": (now + timedelta(days=1)).isoformat(),
                "mode": "queued",
            },
        )
        address = {"name": "Fuzz", "phone": "13800138000", "address": "1 Fuzz Road"}
        order = _post(
            base,
            "/api/v1/orders",
            shopper,
            {"items": [{"sku_id": sku, "quantity": 1}], "shipping_address": address},
        )
        payment = _post(
            base, f"/api/v1/orders/{order['order_id']}/pay", shopper, {"payment_method": "alipay"}
        )
        _post(
            base,
            "/api/v1/admin/coupons",
            admin,
            {
                "code": "FUZZ10",
                "name": "fuzz",
                "type": "amount_off",
                "amount_off": 100,
                "valid_from": now.isoformat(),
                "valid_until": (now + timedelta(days=1)).isoformat(),
            },
        )
        item = _post(base, "/api/v1/cart/items", shopper, {"sku_id": sku, "quantity": 1})
        presale = _post(
            base,
            "/api/v1/presales",
            merchant,
            {"sku_id": sku, "total": 1000, "ends_at": (now + timedelta(days=1)).isoformat()},
        )
        preorder = _post(base, "/api/v1/preorder", shopper, {"product_id": pid, "quantity": 1})
        oid = order["order_id"]
        returned = _returned_order(base, shopper, merchant, sku, address)
        book = _post(
            base,
            "/api/v1/addresses",
            shopper,
            {"name": "Fuzz", "phone": "13800138000", "region": "R", "city": "C", "detail": "D"},
        )
        ids = {
            "/api/v1/products/{id}": {"id": pid},
            "/api/v1/products/{id}/stock": {"id": pid},
            "/api/v1/products/{id}/reserve": {"id": pid},
            "/api/v1/products/{id}/consume": {"id": pid},
            "/api/v1/products/{id}/release": {"id": pid},
            "/api/v1/admin/flash-sales/{sale_id}": {"sale_id": sale["flash_sale_id"]},
            "/api/v1/admin/flash-sales/{sale_id}/close": {"sale_id": sale["flash_sale_id"]},
            "/api/v1/flash-sales/{sale_id}": {"sale_id": sale["flash_sale_id"]},
            "/api/v1/flash-sales/{sale_id}/join": {"sale_id": sale["flash_sale_id"]},
            "/api/v1/flash-sales/{sale_id}/join/{admission}": {
                "sale_id": queued["flash_sale_id"],
                "admission": "1.fuzz",
            },
            "/api/v1/flash-sales/{sale_id}/enter": {"sale_id": queued["flash_sale_id"]},
            "/api/v1/flash-sales/{sale_id}/queue": {"sale_id": queued["flash_sale_id"]},
            "/api/v1/flash-sales/{sale_id}/challenge": {"sale_id": queued["flash_sale_id"]},
            "/api/v1/cart/items/{item_id}": {"item_id": item["cart_item_id"]},
            "/api/v1/presales/{id}": {"id": presale["id"]},
            "/api/v1/preorder/{order_id}": {"order_id": preorder["order_id"]},
            "/api/v1/payment/sandbox/{payment_id}": {"payment_id": payment["payment_id"]},
            "/api/v1/payment/sandbox/{payment_id}/approve": {"payment_id": payment["payment_id"]},
            "/api/v1/payment/sandbox/{payment_id}/fail": {"payment_id": payment["payment_id"]},
            "/api/v1/admin/users/{user_id}": {"user_id": victim},
            "/api/v1/addresses/{address_id}": {"address_id": book["address_id"]},
            "/api/v1/merchant/orders/{id}": {"id": oid},
            "/api/v1/admin/orders/{id}": {"id": oid},
            "/api/v1/admin/orders/{id}/logs": {"id": oid},
            "/api/v1/orders/{id}/returns": {"id": returned["order_id"]},
            "/api/v1/returns/{return_id}/approve": {"return_id": returned["return_id"]},
            "/api/v1/returns/{return_id}/reject": {"return_id": returned["return_id"]},
            "/sale/{sale_id}": {"sale_id": sale["flash_sale_id"]},
            # the one plan whose switch leaves every other operation's answers alone
            "/api/v1/admin/plans/{name}": {"name": "pause-background"},
            "/static/{name}": {"name": "app.css"},
            "/static/vendor/{name}": {"name": "uPlot.min.css"},
        }
        for tail in ("", "/logs", "/cancel", "/pay", "/ship", "/deliver", "/confirm"):
            ids["/api/v1/orders/{id}" + tail] = {"id": oid}
        schema = schemathesis.openapi.from_url(base + "/api/v1/openapi.json")
        yield Live(base, headers, ids, schema)
    finally:
        server.stop()


def _role(route: Route) -> str:
    return {"merchant": "merchant", "merchant-only": "merchant", "admin": "admin"}.get(
        route.auth or "", "user"
    )


# /metrics needs its own token; an event stream never ends while its sale runs, so the
# streams are tested on their own (test_dashboard.py, test_waitingroom.py) rather than by a
# fuzzer waiting for the end of a body
_FUZZED = [r for r in ALL_ROUTES if r.path != "/metrics" and not r.path.endswith("/events")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("route", _FUZZED, ids=[f"{r.method} {r.path}" for r in _FUZZED])
def test_operation_holds_its_schema(live: Live, route: Route) -> None:
    operation = live.schema[route.path][route.method]
    real_ids = live.ids.get(route.path)
    strategy = operation.as_strategy()
    if path_params(route):
        assert real_ids is not None, "give the fuzzer real ids for " + route.path
        strategy = st.one_of(operation.as_strategy(path_parameters=real_ids), strategy)
    negative = operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)
    headers = live.headers[_role(route)]
    allowed = RULE_FIELDS.get((route.method, route.path), set())
    session = requests.Session()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def positive(case: schemathesis.Case[Any]) -> None:
        response = case.call_and_validate(
            base_url=live.base_url, session=session, headers=headers, checks=CHECKS
        )
        if response.status_code in (400, 422):
            body = response.json()
            assert body["error"] != "INVALID_JSON", response.text
            if body["error"] == "VALIDATION_FAILED":
                fields = {re.sub(r"\[[0-9]+\]", "[]", f) for f in body.get("fields") or {}}
                assert fields <= allowed, response.text

    @settings(
        max_examples=MAX_EXAMPLES // 3,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=negative)
    def negative_data(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            base_url=live.base_url,
            session=session,
            headers=headers,
            checks=[not_a_server_error, response_schema_conformance],
        )

    @settings(
        max_examples=MAX_EXAMPLES // 3,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, odd=ODD_HEADERS)
    def odd_header_bytes(case: schemathesis.Case[Any], odd: dict[str, bytes]) -> None:
        response = case.call_and_validate(
            base_url=live.base_url,
            session=session,
            headers={**headers, **odd},
            checks=[not_a_server_error, response_schema_conformance],
        )
        # the reply's own request id is never the client's bytes echoed back
        (echoed,) = response.headers["x-request-id"]
        assert echoed.isascii() and echoed.isprintable(), echoed

    try:
        positive()
        if route.body is not None or route.query or path_params(route):
            negative_data()
        odd_header_bytes()
    finally:
        session.close()
