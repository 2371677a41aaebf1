from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from flashsale import coupons
from flashsale.auth import TokenService
from tests.conftest import auth, make_user
from tests.store_helpers import ADDRESS, make_listed_product

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
CART = "/api/v1/cart"


async def add(client: Client, headers: dict[str, str], **body: Any) -> Any:
    resp = await client.post(f"{CART}/items", json=body, headers=headers)
    payload = await resp.json()
    assert resp.status == 200, payload
    return payload["data"]


async def get_cart(client: Client, headers: dict[str, str]) -> Any:
    resp = await client.get(CART, headers=headers)
    assert resp.status == 200
    return (await resp.json())["data"]


async def test_add_merges_and_get_shows_summary(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    h = auth(tokens, uid)
    pid, (sku,) = await make_listed_product(db, price=5_999, on_hand=20, name="Phone")
    pid2, (sku2,) = await make_listed_product(db, price=1_000)
    first = await add(client, h, product_id=pid, quantity=2, specification={"color": "black"})
    again = await add(client, h, sku_id=sku, quantity=1, specification={"color": "black"})
    assert again["cart_item_id"] == first["cart_item_id"] and again["quantity"] == 3
    other_spec = await add(client, h, sku_id=sku, quantity=1, specification={"color": "white"})
    assert other_spec["cart_item_id"] != first["cart_item_id"]
    last = await add(client, h, product_id=pid2, quantity=4)
    assert last["total_items"] == 3 and last["total_quantity"] == 8

    data = await get_cart(client, h)
    items = {i["cart_item_id"]: i for i in data["items"]}
    item = items[first["cart_item_id"]]
    assert item["product"] == {
        "id": pid,
        "name": "Phone",
        "price": 5_999,
        "image": "https://img.test/w.jpg",
    }
    assert item["quantity"] == 3 and item["subtotal"] == 17_997
    assert item["specification"] == {"color": "black"}
    assert item["available"] is True and item["selected"] is True and item["sku_id"] == sku
    assert items[last["cart_item_id"]]["sku_id"] == sku2
    assert data["summary"] == {
        "total_items": 3,
        "total_quantity": 8,
        "total_amount": 17_997 + 5_999 + 4_000,
        "selected_amount": 17_997 + 5_999 + 4_000,
    }


async def test_add_errors(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    h = auth(tokens, await make_user(db))
    resp = await client.post(f"{CART}/items", json={"sku_id": 10**12, "quantity": 1}, headers=h)
    assert resp.status == 404
    _, (off,) = await make_listed_product(db, status="off_sale")
    resp = await client.post(f"{CART}/items", json={"sku_id": off, "quantity": 1}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "NOT_ON_SALE"
    _, (few,) = await make_listed_product(db, on_hand=2)
    await add(client, h, sku_id=few, quantity=2)
    resp = await client.post(f"{CART}/items", json={"sku_id": few, "quantity": 1}, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "INSUFFICIENT_STOCK"
    resp = await client.post(f"{CART}/items", json={"quantity": 0, "colour": "x"}, headers=h)
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"quantity", "colour"}
    resp = await client.post(f"{CART}/items", json={"quantity": 1}, headers=h)
    assert resp.status == 422 and "product_id" in (await resp.json())["fields"]
    resp = await client.post(
        f"{CART}/items", json={"sku_id": few, "quantity": 1, "specification": {"a": [1]}}, headers=h
    )
    assert resp.status == 422 and "specification" in (await resp.json())["fields"]
    multi, _ = await make_listed_product(db, skus=2)
    resp = await client.post(f"{CART}/items", json={"product_id": multi, "quantity": 1}, headers=h)
    assert resp.status == 422 and "sku_id" in (await resp.json())["fields"]
    picked = await add(client, h, product_id=multi, quantity=1, specification={"size": "s1"})
    assert picked["quantity"] == 1


async def test_update_select_remove_clear(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (a,) = await make_listed_product(db, price=1_000)
    _, (b,) = await make_listed_product(db, price=2_500)
    ia = (await add(client, h, sku_id=a, quantity=1))["cart_item_id"]
    ib = (await add(client, h, sku_id=b, quantity=1))["cart_item_id"]
    resp = await client.put(f"{CART}/items/{ia}", json={"quantity": 3}, headers=h)
    assert resp.status == 200 and (await resp.json())["data"]["quantity"] == 3
    resp = await client.put(f"{CART}/items/{ib}", json={"selected": False}, headers=h)
    assert (await resp.json())["data"]["selected"] is False
    summary = (await get_cart(client, h))["summary"]
    assert summary["total_amount"] == 5_500 and summary["selected_amount"] == 3_000
    resp = await client.put(f"{CART}/items/{ia}", json={}, headers=h)
    assert resp.status == 422
    resp = await client.put(f"{CART}/items/{ia}", json={"quantity": -1}, headers=h)
    assert resp.status == 422 and "quantity" in (await resp.json())["fields"]
    resp = await client.put(f"{CART}/items/{ia}", json={"quantity": 0}, headers=h)
    assert resp.status == 200 and (await resp.json())["data"]["removed"] is True
    assert [i["cart_item_id"] for i in (await get_cart(client, h))["items"]] == [ib]
    resp = await client.delete(f"{CART}/items/{ib}", headers=h)
    assert resp.status == 200
    resp = await client.delete(f"{CART}/items/{ib}", headers=h)
    assert resp.status == 404
    await add(client, h, sku_id=a, quantity=1)
    resp = await client.delete(CART, headers=h)
    assert resp.status == 200
    assert (await get_cart(client, h))["items"] == []


async def test_other_users_item_is_404(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    owner, intruder = auth(tokens, await make_user(db)), auth(tokens, await make_user(db))
    _, (sku,) = await make_listed_product(db)
    item = (await add(client, owner, sku_id=sku, quantity=1))["cart_item_id"]
    resp = await client.put(f"{CART}/items/{item}", json={"quantity": 5}, headers=intruder)
    assert resp.status == 404
    resp = await client.delete(f"{CART}/items/{item}", headers=intruder)
    assert resp.status == 404
    resp = await client.post(
        f"{CART}/checkout/preview", json={"selected_items": [item]}, headers=intruder
    )
    assert resp.status == 404
    resp = await client.put(f"{CART}/items/{item}", json={"quantity": 5}, headers={})
    assert resp.status == 404
    assert (await get_cart(client, owner))["items"][0]["quantity"] == 1


async def test_available_flag_follows_stock(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (sku,) = await make_listed_product(db, on_hand=5)
    await add(client, h, sku_id=sku, quantity=3)
    await db.execute("UPDATE skus SET reserved = 3 WHERE id = $1", sku)
    data = await get_cart(client, h)
    assert data["items"][0]["available"] is False and data["summary"]["selected_amount"] == 0


async def test_guest_cart_and_merge_on_login(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, (a,) = await make_listed_product(db, price=1_000)
    _, (b,) = await make_listed_product(db, price=300)
    resp = await client.post(f"{CART}/items", json={"sku_id": a, "quantity": 2})
    assert resp.status == 200
    token = resp.headers["X-Cart-Token"]
    guest = {"X-Cart-Token": token}
    resp = await client.post(f"{CART}/items", json={"sku_id": b, "quantity": 1}, headers=guest)
    assert resp.headers["X-Cart-Token"] == token
    assert (await resp.json())["data"]["total_items"] == 2
    assert (await get_cart(client, guest))["summary"]["total_quantity"] == 3
    # the user already has one of SKU a: quantities add up on login
    email = f"g{secrets.token_hex(5)}@example.com"
    reg = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": "correct-horse", "nickname": "G"}
    )
    assert reg.status == 201
    uid = await db.fetchval("SELECT id FROM users WHERE email = $1", email)
    await add(client, auth(tokens, uid), sku_id=a, quantity=1)
    resp = await client.post(
        "/api/v1/auth/login", headers=guest, json={"login": email, "password": "correct-horse"}
    )
    assert resp.status == 200
    bearer = {"Authorization": f"Bearer {(await resp.json())['data']['token']}"}
    merged = {i["sku_id"]: i["quantity"] for i in (await get_cart(client, bearer))["items"]}
    assert merged == {a: 3, b: 1}
    assert (await get_cart(client, guest))["items"] == []
    resp = await client.post(f"{CART}/merge", headers={**bearer, **guest})
    assert (await resp.json())["data"]["merged_items"] == 0


async def test_guest_cart_expires(client: Client, db: asyncpg.Pool) -> None:
    _, (sku,) = await make_listed_product(db)
    resp = await client.post(f"{CART}/items", json={"sku_id": sku, "quantity": 1})
    token = resp.headers["X-Cart-Token"]
    await db.execute(
        "UPDATE carts SET expires_at = now() - interval '1 second' WHERE guest_token = $1", token
    )
    assert (await get_cart(client, {"X-Cart-Token": token}))["items"] == []
    resp = await client.post(
        f"{CART}/items", json={"sku_id": sku, "quantity": 1}, headers={"X-Cart-Token": token}
    )
    assert resp.headers["X-Cart-Token"] != token
    assert (await resp.json())["data"]["total_quantity"] == 1


async def test_preview_totals_and_coupons(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (a,) = await make_listed_product(db, price=3_000)
    _, (b,) = await make_listed_product(db, price=1_500)
    ia = (await add(client, h, sku_id=a, quantity=2))["cart_item_id"]
    ib = (await add(client, h, sku_id=b, quantity=1))["cart_item_id"]
    code = "PV" + secrets.token_hex(4).upper()
    await db.execute(
        "INSERT INTO coupons (code, name, type, amount_off_cents, min_amount_cents, starts_at, "
        "ends_at) VALUES ($1, 'save 5', 'amount_off', 500, 6000, now() - interval '1 hour', "
        "now() + interval '1 hour')",
        code,
    )
    # only item a (6000 < free-shipping threshold): shipping is charged
    resp = await client.post(
        f"{CART}/checkout/preview",
        headers=h,
        json={"selected_items": [ia], "coupon_code": code.lower()},
    )
    data = (await resp.json())["data"]
    assert resp.status == 200, data
    assert data["subtotal"] == 6_000 and data["discount"] == 500
    assert data["shipping_fee"] == coupons.SHIPPING_FEE_CENTS
    assert data["total"] == 6_000 - 500 + coupons.SHIPPING_FEE_CENTS
    offer = next(c for c in data["available_coupons"] if c["code"] == code)
    assert offer["applicable"] is True and offer["name"] == "save 5"
    # default selection: every selected item
    resp = await client.post(f"{CART}/checkout/preview", headers=h, json={})
    data = (await resp.json())["data"]
    assert data["subtotal"] == 7_500 and data["discount"] == 0 and len(data["items"]) == 2
    await client.put(f"{CART}/items/{ia}", json={"selected": False}, headers=h)
    resp = await client.post(f"{CART}/checkout/preview", headers=h, json={})
    data = (await resp.json())["data"]
    assert [i["cart_item_id"] for i in data["items"]] == [ib]
    assert next(c for c in data["available_coupons"] if c["code"] == code)["applicable"] is False
    resp = await client.post(f"{CART}/checkout/preview", headers=h, json={"coupon_code": code})
    assert resp.status == 422 and (await resp.json())["error"] == "COUPON_NOT_APPLICABLE"
    resp = await client.post(f"{CART}/checkout/preview", headers=h, json={"selected_items": ["x"]})
    assert resp.status == 422 and "selected_items" in (await resp.json())["fields"]
    resp = await client.post(f"{CART}/checkout/preview", json={})
    assert resp.status == 401


async def test_preview_nothing_selected(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    resp = await client.post(f"{CART}/checkout/preview", headers=h, json={})
    assert resp.status == 422 and "selected_items" in (await resp.json())["fields"]


async def test_checkout_refuses_unavailable_items(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    pid, (sku,) = await make_listed_product(db)
    item = (await add(client, h, sku_id=sku, quantity=1))["cart_item_id"]
    await db.execute("UPDATE products SET status = 'off_sale' WHERE id = $1", pid)
    resp = await client.post(f"{CART}/checkout", headers=h, json={"shipping_address": ADDRESS})
    assert resp.status == 409 and (await resp.json())["error"] == "ITEM_UNAVAILABLE"
    assert (await resp.json())["data"]["cart_item_ids"] == [item]
    resp = await client.post(f"{CART}/checkout", headers=h, json={})
    assert resp.status == 422 and "shipping_address" in (await resp.json())["fields"]


async def test_failed_checkout_keeps_the_cart(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (sku,) = await make_listed_product(db)
    await add(client, h, sku_id=sku, quantity=2)
    resp = await client.post(
        f"{CART}/checkout",
        headers=h,
        json={"shipping_address": ADDRESS, "coupon_code": "NO-SUCH-COUPON"},
    )
    assert resp.status >= 400
    assert (await get_cart(client, h))["items"][0]["quantity"] == 2


async def test_checkout_replay_returns_stored_result(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    key = secrets.token_hex(8)
    stored = {"order_id": "o-" + key, "payment_id": "p-1", "final_amount": 1}
    await db.execute(
        "INSERT INTO cart_checkouts (user_id, idempotency_key, result) VALUES ($1, $2, $3)",
        uid,
        key,
        stored,
    )
    headers = {"Idempotency-Key": key, **auth(tokens, uid)}
    # the cart is empty (the items left with the first checkout): the retry still answers
    resp = await client.post(
        f"{CART}/checkout", headers=headers, json={"shipping_address": ADDRESS}
    )
    assert resp.status == 201 and (await resp.json())["data"] == stored
    other = {"Idempotency-Key": key, **auth(tokens, await make_user(db))}
    resp = await client.post(f"{CART}/checkout", headers=other, json={"shipping_address": ADDRESS})
    assert resp.status == 422  # another user's key is not shared: their cart is empty


# A checkout is one order of the selected lines: the two tests below go through the orders
# area's create_order as POST /orders does.


async def test_checkout_creates_order_and_empties_selection(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (a,) = await make_listed_product(db, price=2_000, on_hand=5)
    _, (b,) = await make_listed_product(db, price=1_000, on_hand=5)
    ia = (await add(client, h, sku_id=a, quantity=2))["cart_item_id"]
    ib = (await add(client, h, sku_id=b, quantity=1))["cart_item_id"]
    resp = await client.post(
        f"{CART}/checkout",
        headers=h,
        json={"selected_items": [ia], "shipping_address": ADDRESS},
    )
    data = (await resp.json())["data"]
    assert resp.status == 201, data
    assert data["order_id"] and data["payment_id"] and data["payment_url"]
    assert data["total_amount"] == 4_000
    assert [i["cart_item_id"] for i in (await get_cart(client, h))["items"]] == [ib]
    assert await db.fetchval("SELECT reserved FROM skus WHERE id = $1", a) == 2


async def test_checkout_idempotency_key(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    h = auth(tokens, await make_user(db))
    _, (sku,) = await make_listed_product(db, price=2_000, on_hand=5)
    await add(client, h, sku_id=sku, quantity=1)
    key = {"Idempotency-Key": secrets.token_hex(8), **h}
    body = {"shipping_address": ADDRESS}
    first = await client.post(f"{CART}/checkout", headers=key, json=body)
    assert first.status == 201, await first.text()
    await add(client, h, sku_id=sku, quantity=1)
    second = await client.post(f"{CART}/checkout", headers=key, json=body)
    assert (await second.json())["data"]["order_id"] == (await first.json())["data"]["order_id"]


async def test_checkout_validates_the_address_like_post_orders(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    h = auth(tokens, uid)
    _, (sku,) = await make_listed_product(db, price=2_000, on_hand=5)
    await add(client, h, sku_id=sku, quantity=1)
    nested: dict[str, Any] = {"x": 1}
    for _ in range(50):
        nested = {"x": nested}
    bad: list[tuple[Any, set[str]]] = [
        ({"city": "HZ"}, {"name", "phone"}),
        # one line (seed 000) or region + city + detail (the address book's form)
        ({**ADDRESS, "city": "HZ"}, {"address", "region", "city", "detail"}),
        ({**ADDRESS, "extra": nested}, {"extra"}),
        ({**ADDRESS, "address": "x" * 100_000}, {"address"}),
        ({**ADDRESS, "phone": ""}, {"phone"}),
        ("1 Test Road", set()),
    ]
    order_body = {"items": [{"sku_id": sku, "quantity": 1}]}
    for address, fields in bad:
        via_cart = await client.post(
            f"{CART}/checkout", headers=h, json={"shipping_address": address}
        )
        via_orders = await client.post(
            "/api/v1/orders", headers=h, json={**order_body, "shipping_address": address}
        )
        assert via_cart.status == via_orders.status == 422, address
        cart_fields = (await via_cart.json())["fields"]
        assert cart_fields == (await via_orders.json())["fields"]
        if fields:
            assert set(cart_fields) == {f"shipping_address.{f}" for f in fields}
    assert await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", uid) == 0
    resp = await client.post(f"{CART}/checkout", headers=h, json={"shipping_address": ADDRESS})
    assert resp.status == 201, await resp.text()
    stored = await db.fetchval(
        "SELECT shipping_address FROM orders WHERE id = $1", (await resp.json())["data"]["order_id"]
    )
    assert stored == ADDRESS


async def test_concurrent_checkouts_of_one_cart_make_one_order(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db)
    h = auth(tokens, uid)
    _, (sku,) = await make_listed_product(db, price=2_000, on_hand=50)
    await add(client, h, sku_id=sku, quantity=2)
    responses = await asyncio.gather(
        *(
            client.post(f"{CART}/checkout", headers=h, json={"shipping_address": ADDRESS})
            for _ in range(4)
        )
    )
    statuses = sorted(r.status for r in responses)
    # a checkout that starts after the winner finished finds the cart empty: 422, no order
    assert statuses.count(201) == 1 and set(statuses) <= {200, 201, 409, 422}, statuses
    bodies = [await r.json() for r in responses]
    order_ids = {b["data"]["order_id"] for r, b in zip(responses, bodies, strict=True) if r.ok}
    assert len(order_ids) == 1
    for body in bodies:
        if body.get("error") == "VALIDATION_FAILED":
            assert body["fields"] == {"selected_items": "no cart items selected"}
        elif "error" in body:
            assert body["error"] == "IDEMPOTENCY_IN_PROGRESS"
    assert await db.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", uid) == 1
    assert await db.fetchval("SELECT reserved FROM skus WHERE id = $1", sku) == 2
    # A later checkout of a refilled cart is a new order.
    await add(client, h, sku_id=sku, quantity=1)
    resp = await client.post(f"{CART}/checkout", headers=h, json={"shipping_address": ADDRESS})
    assert resp.status == 201 and (await resp.json())["data"]["order_id"] not in order_ids


async def test_a_token_whose_account_is_gone_gets_a_clear_answer(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    """A token outlives the account it names (a row removed by hand, or by a data-erasure
    job): a write that would refer to it is refused with a 4xx in the envelope, never a
    500, and nothing is written."""
    uid = await make_user(db)
    h = auth(tokens, uid)
    _, (sku,) = await make_listed_product(db, on_hand=5)
    await db.execute("DELETE FROM users WHERE id = $1", uid)
    resp = await client.post(f"{CART}/items", json={"sku_id": sku, "quantity": 1}, headers=h)
    body = await resp.json()
    assert (resp.status, body["error"]) == (409, "REFERENCE_GONE"), body
    assert await db.fetchval("SELECT count(*) FROM carts WHERE user_id = $1", uid) == 0
