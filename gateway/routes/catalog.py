"""Catalog (seed 000 §2): products, product detail, categories, merchant writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from flashsale import catalog
from flashsale.auth import Principal
from flashsale.catalog import ProductQuery, SkuInput
from flashsale.errors import (
    Forbidden,
    NotFound,
    ProductInUse,
    StockBelowReserved,
    ValidationFailed,
    VersionConflict,
)
from gateway import appkeys
from gateway.http import ok, read_json
from gateway.plans_runtime import catalog_page
from gateway.routing import Route
from gateway.shapes import Answer
from gateway.validation import INT32_MAX, Alt, F, Obj, path_int, validate, validate_query

MAX_CENTS = 10**12
MAX_STOCK = 2_000_000_000

SKU_CREATE = {
    "attributes": F(dict, required=False, default={}),
    "price": F(int, min=0, max=MAX_CENTS),
    "stock": F(int, required=False, default=0, min=0, max=MAX_STOCK),
    "code": F(str, required=False, nullable=True, max_len=64),
}
SKU_UPDATE = Obj(
    {
        "id": F(int, required=False, nullable=True, min=1),
        "attributes": F(dict, required=False, nullable=True),
        "price": F(int, required=False, nullable=True, min=0, max=MAX_CENTS),
        "stock": F(int, required=False, nullable=True, min=0, max=MAX_STOCK),
        "code": F(str, required=False, nullable=True, max_len=64),
    },
    alts=(Alt(("id",)), Alt(("price",))),  # a new SKU (no id) needs its price
)
PRODUCT_CREATE = Obj(
    {
        "name": F(str, min_len=1, max_len=200),
        "description": F(str, required=False, default="", max_len=20_000),
        "category_id": F(int, required=False, nullable=True, min=1),
        "images": F(list, required=False, default=[], max_len=20, items=F(str, max_len=2000)),
        "attributes": F(dict, required=False, default={}),
        "skus": F(list, required=False, min_len=1, max_len=100, items=F(dict, fields=SKU_CREATE)),
        "price": F(int, required=False, min=0, max=MAX_CENTS),
        "stock": F(int, required=False, min=0, max=MAX_STOCK),
        "max_per_user": F(int, required=False, nullable=True, min=1, max=1_000_000),
    },
    alts=(Alt(present=("skus",), absent=("price", "stock")), Alt(("price",), absent=("skus",))),
)
PRODUCT_UPDATE = {
    "name": F(str, required=False, min_len=1, max_len=200),
    "description": F(str, required=False, max_len=20_000),
    "category_id": F(int, required=False, nullable=True, min=1),
    "images": F(list, required=False, max_len=20, items=F(str, max_len=2000)),
    "attributes": F(dict, required=False),
    "status": F(str, required=False, choices=("on_sale", "off_sale")),
    "skus": F(list, required=False, max_len=100, items=F(dict, fields=SKU_UPDATE)),
    "price": F(int, required=False, min=0, max=MAX_CENTS),
    "stock": F(int, required=False, min=0, max=MAX_STOCK),
    "max_per_user": F(int, required=False, nullable=True, min=1, max=1_000_000),
    "version": F(int, required=False, min=1, max=INT32_MAX),
}
LIST_QUERY = {
    "category": F(
        str,
        required=False,
        max_len=100,
        doc="category id or name (includes its sub-categories)",
    ),
    "price_min": F(int, required=False, min=0, max=MAX_CENTS, doc="lowest price in cents"),
    "price_max": F(int, required=False, min=0, max=MAX_CENTS, doc="highest price in cents"),
    "q": F(
        str,
        required=False,
        max_len=200,
        doc="search words (all must appear in name or description)",
    ),
    "sort": F(str, default="created,desc", choices=tuple(catalog.SORTS)),
    "page": F(int, default=1, min=1, max=100_000, doc="page number from 1"),
    "limit": F(int, default=20, min=1, max=catalog.MAX_LIMIT, doc="page size"),
}


def _skus(items: list[dict[str, Any]], schema: Mapping[str, F]) -> list[SkuInput]:
    out: list[SkuInput] = []
    errors: dict[str, str] = {}
    for i, item in enumerate(items):
        try:
            v = validate(item, schema)
        except ValidationFailed as exc:
            errors.update({f"skus[{i}].{k}": m for k, m in (exc.fields or {}).items()})
            continue
        out.append(
            SkuInput(
                price=v.get("price"),
                stock=v.get("stock"),
                attributes=v.get("attributes"),
                code=v.get("code"),
                id=v.get("id"),
            )
        )
    if errors:
        raise ValidationFailed(fields=errors)
    return out


async def list_products(request: web.Request) -> web.Response:
    q = validate_query(request.query, LIST_QUERY)
    price_min, price_max = q.get("price_min"), q.get("price_max")
    if price_min is not None and price_max is not None and price_min > price_max:
        raise ValidationFailed(fields={"price_max": "must be >= price_min"})
    query = ProductQuery(
        category=q.get("category") or None,
        price_min=price_min,
        price_max=price_max,
        q=q.get("q") or None,
        sort=q["sort"],
        page=q["page"],
        limit=q["limit"],
    )
    return await catalog_page(
        request, lambda: catalog.list_products(request.app[appkeys.DB], query)
    )


async def get_product(request: web.Request) -> web.Response:
    product_id = path_int(request.match_info["id"], "product")
    return await catalog_page(
        request,
        lambda: catalog.product_detail(
            request.app[appkeys.DB], request.app[appkeys.REDIS], product_id
        ),
    )


async def categories(request: web.Request) -> web.Response:
    return await catalog_page(request, lambda: catalog.category_tree(request.app[appkeys.DB]))


async def create_product(request: web.Request, principal: Principal) -> web.Response:
    body = validate(await read_json(request), PRODUCT_CREATE)
    if "skus" in body:
        if "price" in body or "stock" in body:
            raise ValidationFailed(fields={"skus": "send either skus or price/stock, not both"})
        skus = _skus(body["skus"], SKU_CREATE)
    elif "price" in body:
        skus = [SkuInput(price=body["price"], stock=body.get("stock", 0))]
    else:
        raise ValidationFailed(fields={"skus": "skus (or price and stock) are required"})
    pool = request.app[appkeys.DB]
    pid = await catalog.create_product(
        pool,
        principal,
        name=body["name"],
        description=body["description"],
        category_id=body.get("category_id"),
        images=body["images"],
        attributes=body["attributes"],
        skus=skus,
        max_per_user=body.get("max_per_user"),
    )
    detail = await catalog.load_detail(pool, pid)
    return ok(detail, status=201, message="created")


async def update_product(request: web.Request, principal: Principal) -> web.Response:
    product_id = path_int(request.match_info["id"], "product")
    body = validate(await read_json(request), PRODUCT_UPDATE)
    skus = _skus(body.get("skus", []), SKU_UPDATE)
    flat = (
        SkuInput(price=body.get("price"), stock=body.get("stock"))
        if "price" in body or "stock" in body
        else None
    )
    names = ("name", "description", "category_id", "images", "attributes", "status", "max_per_user")
    fields: dict[str, Any] = {k: body[k] for k in names if k in body}
    pool, redis = request.app[appkeys.DB], request.app[appkeys.REDIS]
    version = await catalog.update_product(
        pool, redis, principal, product_id, fields, skus, version=body.get("version"), flat=flat
    )
    detail = await catalog.load_detail(pool, product_id)
    return ok(
        detail or {"id": product_id, "version": version, "status": "off_sale"}, message="updated"
    )


async def delete_product(request: web.Request, principal: Principal) -> web.Response:
    product_id = path_int(request.match_info["id"], "product")
    await catalog.delete_product(
        request.app[appkeys.DB], request.app[appkeys.REDIS], principal, product_id
    )
    return ok({"id": product_id, "status": "off_sale"}, message="taken off sale")


class ProductItem(Answer):
    id: int
    name: str
    price: int | None  # the cheapest SKU on sale; None when none is
    image: str | None
    stock: int
    category: str | None
    sales: int


class ProductPage(Answer):
    products: list[ProductItem]
    total: int
    page: int
    limit: int


class SkuView(Answer):
    id: int
    code: str | None
    attributes: dict[str, Any]
    price: int
    stock: int


class CategoryRef(Answer):
    id: int
    name: str
    parent: str | None
    parent_id: int | None


class CategoryStep(Answer):
    id: int
    name: str


class ProductDetail(Answer):
    id: int
    name: str
    description: str
    price: int | None
    images: list[str]
    image: str | None
    stock: int
    category: CategoryRef | None
    category_path: list[CategoryStep]
    attributes: dict[str, Any]
    skus: list[SkuView]
    merchant_id: int
    status: str
    sales: int
    max_per_user: int | None
    version: int
    created_at: str
    updated_at: str


class Category(Answer):
    id: int
    name: str
    parent_id: int | None
    children: list[Category]


ROUTES = [
    Route(
        "GET",
        "/api/v1/products",
        list_products,
        "List and search on-sale products",
        query=LIST_QUERY,
        responses=(ValidationFailed,),
        rules="price_max >= price_min",
        tag="catalog",
        answer=ProductPage,
    ),
    Route(
        "GET",
        "/api/v1/products/{id}",
        get_product,
        "Product detail with SKUs and category path (cached)",
        responses=(NotFound,),
        tag="catalog",
        answer=ProductDetail,
    ),
    Route(
        "GET",
        "/api/v1/categories",
        categories,
        "The category tree",
        tag="catalog",
        answer=list[Category],
    ),
    Route(
        "POST",
        "/api/v1/products",
        create_product,
        "Create a product with its SKUs (or flat price/stock = one SKU)",
        auth="merchant",
        body=PRODUCT_CREATE,
        success={201: "created"},
        responses=(Forbidden, ValidationFailed),
        tag="catalog",
    ),
    Route(
        "PUT",
        "/api/v1/products/{id}",
        update_product,
        "Update a product and its SKUs (own products; admin any)",
        auth="merchant",
        body=PRODUCT_UPDATE,
        responses=(
            Forbidden,
            NotFound,
            VersionConflict,
            StockBelowReserved,
            ProductInUse,
            ValidationFailed,
        ),
        tag="catalog",
    ),
    Route(
        "DELETE",
        "/api/v1/products/{id}",
        delete_product,
        "Take a product off sale (own products; admin any)",
        auth="merchant",
        responses=(Forbidden, NotFound, ProductInUse),
        tag="catalog",
    ),
]
