"""Bad input is a 404 or a 422, never a 500: NUL, non-ASCII digits, huge ids, far dates."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from flashsale.auth import TokenService
from tests.conftest import auth, make_user
from tests.store_helpers import ADDRESS, make_product

pytestmark = pytest.mark.integration

BIG = 2**63  # one past PostgreSQL's BIGINT


@pytest.fixture
async def shopper(db: asyncpg.Pool, tokens: TokenService) -> dict[str, str]:
    return auth(tokens, await make_user(db))


@pytest.fixture
async def merchant(db: asyncpg.Pool, tokens: TokenService) -> tuple[int, dict[str, str]]:
    uid = await make_user(db, "merchant")
    return uid, auth(tokens, uid, "merchant")


async def _status(resp: Any) -> tuple[int, Any]:
    text = await resp.text()
    assert resp.status < 500, text
    return resp.status, await resp.json()


# --- finding 13: a NUL anywhere a string reaches PostgreSQL -------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/auth/register", {"email": "a@b.cn", "password": "x" * 10, "nickname": "n\x00"}),
        ("/api/v1/auth/register", {"email": "a\x00@b.cn", "password": "x" * 10, "nickname": "n"}),
        ("/api/v1/auth/login", {"login": "a\x00@b.cn", "password": "whatever1"}),
    ],
)
async def test_nul_in_public_bodies_is_422(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> None:
    status, payload = await _status(await client.post(path, json=body))
    assert status == 422 and payload["error"] == "VALIDATION_FAILED"


async def test_nul_in_shopper_bodies_is_422(
    client: TestClient[Any, Any], shopper: dict[str, str]
) -> None:
    cases = [
        ("/api/v1/coupons/use", {"coupon_code": "A\x00B", "order_amount": 100}),
        ("/api/v1/payment/create", {"order_id": "1\x00", "payment_method": "alipay"}),
        (
            "/api/v1/payment/refund",
            {"order_id": "1", "refund_amount": 1, "reason": "r\x00"},
        ),
        (
            "/api/v1/orders",
            {
                "items": [{"sku_id": 1, "quantity": 1}],
                "shipping_address": {**ADDRESS, "address": "road\x00"},
            },
        ),
        ("/api/v1/cart/checkout", {"shipping_address": {"city": "H\x00Z"}}),
        ("/api/v1/cart/checkout", {"shipping_address": {"ci\x00ty": "HZ"}}),
        ("/api/v1/cart/items", {"sku_id": 1, "quantity": 1, "specification": {"c": "\x00"}}),
    ]
    for path, body in cases:
        status, payload = await _status(await client.post(path, json=body, headers=shopper))
        assert status == 422, (path, payload)


async def test_nul_in_notify_is_422(client: TestClient[Any, Any]) -> None:
    body = {
        "payment_id": "p\x00",
        "order_id": "1",
        "status": "success",
        "amount": 1,
        "sign": "s",
    }
    status, _ = await _status(await client.post("/api/v1/payment/notify", json=body))
    assert status == 422


async def test_nul_in_product_name_and_attributes_is_422(
    client: TestClient[Any, Any], merchant: tuple[int, dict[str, str]]
) -> None:
    _, headers = merchant
    for body in (
        {"name": "phone\x00", "price": 100, "stock": 1},
        {"name": "phone", "price": 100, "stock": 1, "attributes": {"k": "v\x00"}},
        {"name": "phone", "skus": [{"price": 1, "code": "c\x00"}]},
    ):
        status, _ = await _status(await client.post("/api/v1/products", json=body, headers=headers))
        assert status == 422, body


async def test_nul_in_query_and_path_is_rejected(
    client: TestClient[Any, Any], shopper: dict[str, str]
) -> None:
    status, _ = await _status(await client.get("/api/v1/products", params={"q": "a\x00b"}))
    assert status == 422
    status, _ = await _status(await client.get("/api/v1/products", params={"category": "\x00"}))
    assert status == 422
    for path in (
        "/api/v1/orders/1%00",
        "/api/v1/orders/1%00/logs",
        "/api/v1/payment/sandbox/p%00",
        "/api/v1/preorder/1%00",
    ):
        status, _ = await _status(await client.get(path, headers=shopper))
        assert status == 404, path


# --- finding 14: unicode digits, ids past BIGINT, far dates -------------------------------


async def test_unicode_digit_and_huge_path_ids_are_404(
    client: TestClient[Any, Any], shopper: dict[str, str]
) -> None:
    for seg in ("²", "¹", "١٢", str(BIG), "9" * 19, "0"):
        for method, path in (
            ("GET", f"/api/v1/products/{seg}"),
            ("GET", f"/api/v1/products/{seg}/stock"),
            ("GET", f"/api/v1/flash-sales/{seg}"),
            ("POST", f"/api/v1/flash-sales/{seg}/join"),
            ("PUT", f"/api/v1/cart/items/{seg}"),
            ("DELETE", f"/api/v1/cart/items/{seg}"),
            ("GET", f"/api/v1/presales/{seg}"),
            ("GET", f"/api/v1/preorder/{seg}"),
        ):
            resp = await client.request(method, path, json={"quantity": 1}, headers=shopper)
            status, _ = await _status(resp)
            assert status == 404, (method, path)


async def test_unicode_digit_and_huge_query_ids_are_422_or_empty(
    client: TestClient[Any, Any], shopper: dict[str, str]
) -> None:
    # a category that is not an ASCII id is a name: no such category, no products
    for category in ("²", "9" * 25):
        status, payload = await _status(
            await client.get("/api/v1/products", params={"category": category})
        )
        assert status == 200 and payload["data"]["products"] == []
    for params in ({"price_min": "²"}, {"page": "¹"}, {"limit": str(BIG)}):
        status, _ = await _status(await client.get("/api/v1/products", params=params))
        assert status == 422, params
    status, _ = await _status(
        await client.get("/api/v1/preorder", params={"user_id": str(BIG)}, headers=shopper)
    )
    assert status == 422


async def test_huge_ids_in_bodies_are_422(
    client: TestClient[Any, Any],
    db: asyncpg.Pool,
    shopper: dict[str, str],
    merchant: tuple[int, dict[str, str]],
) -> None:
    uid, merchant_headers = merchant
    pid, (sku,) = await make_product(db, uid, [(100, 5)])
    cases = [
        ("/api/v1/cart/items", {"sku_id": BIG, "quantity": 1}, shopper),
        ("/api/v1/cart/checkout/preview", {"selected_items": [BIG]}, shopper),
        (
            "/api/v1/orders",
            {"items": [{"sku_id": BIG, "quantity": 1}], "shipping_address": ADDRESS},
            shopper,
        ),
        ("/api/v1/preorder", {"product_id": BIG, "quantity": 1}, shopper),
        (
            "/api/v1/coupons/use",
            {"coupon_code": "X1", "order_amount": 1, "product_ids": [BIG]},
            shopper,
        ),
        (
            "/api/v1/payment/create",
            {"order_id": "1", "payment_method": "alipay", "amount": BIG},
            shopper,
        ),
        (f"/api/v1/products/{pid}/reserve", {"sku_id": BIG, "quantity": 1}, merchant_headers),
        ("/api/v1/products", {"name": "x", "price": 1, "category_id": BIG}, merchant_headers),
    ]
    for path, body, headers in cases:
        status, payload = await _status(await client.post(path, json=body, headers=headers))
        assert status == 422, (path, payload)
    assert sku  # the product exists: the 422s are about the ids, not a missing product


async def test_far_dates_are_422(client: TestClient[Any, Any], shopper: dict[str, str]) -> None:
    for params in (
        {"to": "9999-12-31"},
        {"from": "9999-12-31T23:59:59-23:59"},
        {"from": "0001-01-01T00:00:00+01:00"},
        {"to": "2024-02-31"},
    ):
        status, _ = await _status(
            await client.get("/api/v1/preorder", params=params, headers=shopper)
        )
        assert status == 422, params
    status, _ = await _status(
        await client.get("/api/v1/preorder", params={"to": "2024-02-28"}, headers=shopper)
    )
    assert status == 200
