from __future__ import annotations

import secrets
import socket
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from flashsale import catalog
from flashsale.auth import TokenService
from flashsale.errors import NotFound
from tests.conftest import auth, make_user

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


def _tag() -> str:
    return "zq" + secrets.token_hex(4)


async def _category(db: asyncpg.Pool, name: str, parent: int | None = None) -> int:
    cid: int = await db.fetchval(
        "INSERT INTO categories (name, parent_id) VALUES ($1, $2) RETURNING id", name, parent
    )
    return cid


async def _create(client: Client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/products", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


async def _merchant(db: asyncpg.Pool, tokens: TokenService) -> tuple[int, dict[str, str]]:
    uid = await make_user(db, "merchant")
    return uid, auth(tokens, uid, "merchant")


async def test_create_and_detail(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    tag = _tag()
    root = await _category(db, f"Electronics {tag}")
    phones = await _category(db, f"Phones {tag}", root)
    _, h = await _merchant(db, tokens)
    created = await _create(
        client,
        h,
        name=f"iPhone {tag}",
        description="A phone",
        category_id=phones,
        images=["a.jpg", "b.jpg"],
        attributes={"brand": "Apple"},
        skus=[
            {"attributes": {"color": "black"}, "price": 599900, "stock": 50},
            {"attributes": {"color": "blue"}, "price": 699900, "stock": 30},
        ],
    )
    assert created["price"] == 599900 and created["stock"] == 80
    resp = await client.get(f"/api/v1/products/{created['id']}")
    assert resp.status == 200
    d = (await resp.json())["data"]
    assert d["images"] == ["a.jpg", "b.jpg"]
    assert d["category"] == {
        "id": phones,
        "name": f"Phones {tag}",
        "parent": f"Electronics {tag}",
        "parent_id": root,
    }
    assert [c["id"] for c in d["category_path"]] == [root, phones]
    assert d["attributes"] == {"brand": "Apple"}
    assert [(s["price"], s["stock"], s["attributes"]) for s in d["skus"]] == [
        (599900, 50, {"color": "black"}),
        (699900, 30, {"color": "blue"}),
    ]


async def test_create_flat_form(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    _, h = await _merchant(db, tokens)
    created = await _create(client, h, name="Flat " + _tag(), price=299900, stock=100)
    assert len(created["skus"]) == 1
    assert created["price"] == 299900 and created["stock"] == 100


async def test_create_validation(client: Client, db: asyncpg.Pool, tokens: TokenService) -> None:
    _, h = await _merchant(db, tokens)
    resp = await client.post(
        "/api/v1/products",
        headers=h,
        json={"name": "", "skus": [{"price": -1}, {"stock": 1}], "colour": "x"},
    )
    assert resp.status == 422
    fields = (await resp.json())["fields"]
    assert set(fields) == {"name", "colour", "skus[0].price", "skus[1].price"}
    resp = await client.post(
        "/api/v1/products", headers=h, json={"name": "x", "skus": [{"price": -1}, {"stock": 1}]}
    )
    fields = (await resp.json())["fields"]
    assert set(fields) == {"skus[0].price", "skus[1].price"}
    resp = await client.post("/api/v1/products", headers=h, json={"name": "x"})
    assert resp.status == 422 and "skus" in (await resp.json())["fields"]
    resp = await client.post(
        "/api/v1/products", headers=h, json={"name": "x", "price": 1, "category_id": 10**12}
    )
    assert resp.status == 422 and "category_id" in (await resp.json())["fields"]


async def test_create_requires_merchant(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    uid = await make_user(db, "user")
    resp = await client.post(
        "/api/v1/products", headers=auth(tokens, uid, "user"), json={"name": "x", "price": 1}
    )
    assert resp.status == 403
    resp = await client.post("/api/v1/products", json={"name": "x", "price": 1})
    assert resp.status == 401


async def test_list_filter_search_sort_page(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    tag = _tag()
    root = await _category(db, f"Root {tag}")
    child = await _category(db, f"Child {tag}", root)
    grandchild = await _category(db, f"Grand {tag}", child)
    other = await _category(db, f"Other {tag}")
    _, h = await _merchant(db, tokens)
    a = await _create(
        client,
        h,
        name=f"Alpha {tag} phone",
        description="cheap",
        category_id=root,
        price=1000,
        stock=5,
    )
    b = await _create(
        client,
        h,
        name=f"Beta {tag}",
        description="a phone 100%",
        category_id=child,
        price=3000,
        stock=7,
    )
    c = await _create(
        client,
        h,
        name=f"Gamma {tag}",
        description="tablet",
        category_id=grandchild,
        skus=[{"price": 2000, "stock": 1}, {"price": 500, "stock": 2}],
    )
    d = await _create(
        client, h, name=f"Delta {tag}", description="phone", category_id=other, price=9000, stock=1
    )
    await db.execute("UPDATE products SET sales = 10 WHERE id = $1", b["id"])
    await db.execute("UPDATE products SET sales = 5 WHERE id = $1", c["id"])

    async def ids(**params: Any) -> tuple[list[int], dict[str, Any]]:
        resp = await client.get("/api/v1/products", params={k: str(v) for k, v in params.items()})
        assert resp.status == 200, await resp.text()
        data = (await resp.json())["data"]
        return [p["id"] for p in data["products"]], data

    got, data = await ids(category=root, sort="price,asc")
    assert got == [c["id"], a["id"], b["id"]] and data["total"] == 3
    item = data["products"][0]
    assert item == {
        "id": c["id"],
        "name": f"Gamma {tag}",
        "price": 500,
        "image": None,
        "stock": 3,
        "category": f"Grand {tag}",
        "sales": 5,
    }
    got, _ = await ids(category=f"child {tag}".upper(), sort="price,desc")
    assert got == [b["id"], c["id"]]
    got, _ = await ids(q=tag, price_min=1000, price_max=3000, sort="price,asc")
    assert got == [a["id"], b["id"]]
    got, _ = await ids(q=f"{tag} phone", sort="price,asc")
    assert got == [a["id"], b["id"], d["id"]]
    got, _ = await ids(q=f"{tag} 100%")
    assert got == [b["id"]]
    got, _ = await ids(q=tag, sort="sales,desc", limit=2)
    assert got[:2] == [b["id"], c["id"]]
    got, data = await ids(q=tag, sort="created,desc", limit=3, page=2)
    assert got == [a["id"]] and data["total"] == 4 and data["page"] == 2 and data["limit"] == 3
    got, data = await ids(q=tag, page=9)
    assert got == [] and data["total"] == 4
    got, _ = await ids(category=10**12)
    assert got == []


async def test_list_validation(client: Client) -> None:
    for params in (
        {"sort": "name,asc"},
        {"limit": "101"},
        {"page": "0"},
        {"price_min": "x"},
        {"price_min": "5", "price_max": "4"},
    ):
        resp = await client.get("/api/v1/products", params=params)
        assert resp.status == 422, params
        assert (await resp.json())["fields"]


async def test_categories_tree(client: Client, db: asyncpg.Pool) -> None:
    tag = _tag()
    root = await _category(db, f"R {tag}")
    child = await _category(db, f"C {tag}", root)
    leaf = await _category(db, f"L {tag}", child)
    resp = await client.get("/api/v1/categories")
    assert resp.status == 200
    tree = (await resp.json())["data"]
    node = next(n for n in tree if n["id"] == root)
    assert node == {
        "id": root,
        "name": f"R {tag}",
        "parent_id": None,
        "children": [
            {
                "id": child,
                "name": f"C {tag}",
                "parent_id": root,
                "children": [{"id": leaf, "name": f"L {tag}", "parent_id": child, "children": []}],
            }
        ],
    }


async def test_update_permissions_and_version(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    _, other = await _merchant(db, tokens)
    admin = await make_user(db, "admin")
    p = await _create(client, h, name="Upd " + _tag(), price=1000, stock=10)
    url = f"/api/v1/products/{p['id']}"
    resp = await client.put(url, headers=other, json={"name": "stolen"})
    assert resp.status == 403
    resp = await client.delete(url, headers=other)
    assert resp.status == 403
    resp = await client.put(url, headers=h, json={"price": 900, "stock": 20, "version": 1})
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    assert data["price"] == 900 and data["stock"] == 20 and data["version"] == 2
    resp = await client.put(url, headers=h, json={"name": "again", "version": 1})
    assert resp.status == 409 and (await resp.json())["error"] == "VERSION_CONFLICT"
    resp = await client.put(
        url, headers=auth(tokens, admin, "admin"), json={"name": "by admin", "version": 2}
    )
    assert resp.status == 200 and (await resp.json())["data"]["name"] == "by admin"
    resp = await client.put(url, headers=h, json={"price": -5, "skus": [{"id": "x"}]})
    assert resp.status == 422
    assert set((await resp.json())["fields"]) == {"price", "skus[0].id"}
    resp = await client.put("/api/v1/products/999999999", headers=h, json={"name": "x"})
    assert resp.status == 404


async def test_update_skus_and_reserved_floor(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    p = await _create(
        client,
        h,
        name="Skus " + _tag(),
        skus=[{"price": 100, "stock": 10}, {"price": 200, "stock": 10}],
    )
    s1, s2 = (s["id"] for s in p["skus"])
    url = f"/api/v1/products/{p['id']}"
    await db.execute("UPDATE skus SET reserved = 4 WHERE id = $1", s1)
    resp = await client.put(url, headers=h, json={"skus": [{"id": s1, "stock": 3}]})
    assert resp.status == 409 and (await resp.json())["error"] == "STOCK_BELOW_RESERVED"
    resp = await client.put(url, headers=h, json={"price": 5})
    assert resp.status == 422
    resp = await client.put(
        url,
        headers=h,
        json={
            "skus": [{"id": s1, "stock": 4}, {"id": s2, "price": 150}, {"price": 300, "stock": 1}]
        },
    )
    assert resp.status == 200, await resp.text()
    skus = (await resp.json())["data"]["skus"]
    assert [(s["price"], s["stock"]) for s in skus] == [(100, 0), (150, 10), (300, 1)]
    other = await _create(client, h, name="Other " + _tag(), price=1, stock=1)
    resp = await client.put(
        url, headers=h, json={"skus": [{"id": other["skus"][0]["id"], "price": 1}]}
    )
    assert resp.status == 422 and "skus[0].id" in (await resp.json())["fields"]


async def test_cache_invalidated_by_update(
    client: Client, db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    p = await _create(client, h, name="Cached " + _tag(), price=1000, stock=10)
    url = f"/api/v1/products/{p['id']}"
    assert (await client.get(url)).status == 200
    assert await redis.exists(catalog.detail_key(p["id"])) == 1
    # A write behind the gateway's back is not seen while the cache holds the detail...
    await db.execute("UPDATE products SET description = 'sneaky' WHERE id = $1", p["id"])
    assert (await (await client.get(url)).json())["data"]["description"] == ""
    # ...while an update through the API drops the cached copy.
    resp = await client.put(url, headers=h, json={"price": 777})
    assert resp.status == 200
    assert await redis.exists(catalog.detail_key(p["id"])) == 0
    data = (await (await client.get(url)).json())["data"]
    assert data["price"] == 777 and data["description"] == "sneaky"


async def test_detail_degrades_when_redis_is_down(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    p = await _create(client, h, name="NoRedis " + _tag(), price=1000, stock=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        detail = await catalog.product_detail(db, dead, p["id"])
        assert detail["id"] == p["id"] and detail["price"] == 1000
        await catalog.invalidate(dead, p["id"])
        with pytest.raises(NotFound):
            await catalog.product_detail(db, dead, 10**15)
    finally:
        await dead.aclose()


async def test_delete_refused_while_in_orders(
    client: Client, db: asyncpg.Pool, redis: Redis, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    buyer = await make_user(db)
    p = await _create(client, h, name="Del " + _tag(), price=1000, stock=10)
    url = f"/api/v1/products/{p['id']}"
    assert (await client.get(url)).status == 200
    order_id = "t" + secrets.token_hex(8)
    await db.execute(
        "INSERT INTO orders (id, user_id, kind, status, total_cents, pay_cents) "
        "VALUES ($1, $2, 'regular', 'paid', 1000, 1000)",
        order_id,
        buyer,
    )
    await db.execute(
        "INSERT INTO order_items (order_id, product_id, sku_id, quantity, "
        "price_cents) VALUES ($1, $2, $3, 1, 1000)",
        order_id,
        p["id"],
        p["skus"][0]["id"],
    )
    resp = await client.delete(url, headers=h)
    assert resp.status == 409 and (await resp.json())["error"] == "PRODUCT_IN_USE"
    resp = await client.put(url, headers=h, json={"status": "off_sale"})
    assert resp.status == 409
    await db.execute("UPDATE orders SET status = 'completed' WHERE id = $1", order_id)
    resp = await client.delete(url, headers=h)
    assert resp.status == 200
    assert await db.fetchval("SELECT status FROM products WHERE id = $1", p["id"]) == "off_sale"
    assert (await client.get(url)).status == 404
    resp = await client.get("/api/v1/products", params={"q": p["name"]})
    assert (await resp.json())["data"]["total"] == 0
    # the order was made complete by hand, with no payment: reconcile's money checks, run
    # by other tests over this shared database, would rightly call it drift
    await db.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", order_id)


async def test_admin_may_delete_any_user_may_not(
    client: Client, db: asyncpg.Pool, tokens: TokenService
) -> None:
    _, h = await _merchant(db, tokens)
    p = await _create(client, h, name="Adm " + _tag(), price=100, stock=1)
    url = f"/api/v1/products/{p['id']}"
    shopper = await make_user(db)
    resp = await client.put(url, headers=auth(tokens, shopper), json={"name": "x"})
    assert resp.status == 403
    admin = await make_user(db, "admin")
    resp = await client.delete(url, headers=auth(tokens, admin, "admin"))
    assert resp.status == 200
    assert (await client.get(url)).status == 404
    resp = await client.put(url, headers=h, json={"status": "on_sale"})
    assert resp.status == 200 and (await resp.json())["data"]["status"] == "on_sale"
    assert (await client.get(url)).status == 200
