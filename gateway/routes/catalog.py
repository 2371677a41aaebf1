"""Catalog (seed 000 §2): products, product detail, categories, merchant writes."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import catalog
from flashsale import errors as E
from flashsale.auth import Principal
from flashsale.catalog import ProductQuery, SkuInput
from gateway import appkeys
from gateway.http import ok
from gateway.plans_runtime import catalog_page
from gateway.routing import Route
from gateway.shapes import Answer, Body, Query, as_dict, one_of, or_none, read_body, read_query
from gateway.validation import INT32_MAX, Alt, path_int

MAX_CENTS = 10**12
MAX_STOCK = 2_000_000_000

Cents = Annotated[int, Meta(ge=0, le=MAX_CENTS)]
Stock = Annotated[int, Meta(ge=0, le=MAX_STOCK)]
SkuCode = Annotated[str, Meta(max_length=64)]
# A free-form map of short names to JSON scalars (see gateway.validation.F).
Attributes = dict[str, Any]
Images = Annotated[list[Annotated[str, Meta(max_length=2000)]], Meta(max_length=20)]
MaxPerUser = Annotated[int, Meta(ge=1, le=1_000_000)]
CategoryId = Annotated[int, Meta(ge=1)]


class NewSku(Body, kw_only=True):
    attributes: Attributes = msgspec.field(default_factory=dict)
    price: Cents
    stock: Stock = 0
    code: SkuCode | UnsetType | None = UNSET


class SkuChange(Body):
    id: Annotated[int, Meta(ge=1)] | UnsetType | None = UNSET
    attributes: Attributes | UnsetType | None = UNSET
    price: Cents | UnsetType | None = UNSET
    stock: Stock | UnsetType | None = UNSET
    code: SkuCode | UnsetType | None = UNSET
    alternatives = (Alt(("id",)), Alt(("price",)))  # a new SKU (no id) needs its price


class NewProduct(Body, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    description: Annotated[str, Meta(max_length=20_000)] = ""
    category_id: CategoryId | UnsetType | None = UNSET
    images: Images = msgspec.field(default_factory=list)
    attributes: Attributes = msgspec.field(default_factory=dict)
    skus: Annotated[list[NewSku], Meta(min_length=1, max_length=100)] | UnsetType = UNSET
    price: Cents | UnsetType = UNSET
    stock: Stock | UnsetType = UNSET
    max_per_user: MaxPerUser | UnsetType | None = UNSET
    alternatives = (
        Alt(present=("skus",), absent=("price", "stock")),
        Alt(("price",), absent=("skus",)),
    )


class ProductChange(Body):
    name: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType = UNSET
    description: Annotated[str, Meta(max_length=20_000)] | UnsetType = UNSET
    category_id: CategoryId | UnsetType | None = UNSET
    images: Images | UnsetType = UNSET
    attributes: Attributes | UnsetType = UNSET
    status: Annotated[str, one_of(("on_sale", "off_sale"))] | UnsetType = UNSET
    skus: Annotated[list[SkuChange], Meta(max_length=100)] | UnsetType = UNSET
    price: Cents | UnsetType = UNSET
    stock: Stock | UnsetType = UNSET
    max_per_user: MaxPerUser | UnsetType | None = UNSET
    version: Annotated[int, Meta(ge=1, le=INT32_MAX)] | UnsetType = UNSET


class ProductList(Query):
    category: (
        Annotated[
            str,
            Meta(max_length=100, description="category id or name (includes its sub-categories)"),
        ]
        | None
    ) = None
    price_min: Annotated[Cents, Meta(description="lowest price in cents")] | None = None
    price_max: Annotated[Cents, Meta(description="highest price in cents")] | None = None
    q: (
        Annotated[
            str,
            Meta(
                max_length=200, description="search words (all must appear in name or description)"
            ),
        ]
        | None
    ) = None
    sort: Annotated[str, one_of(catalog.SORTS)] = "created,desc"
    page: Annotated[int, Meta(ge=1, le=100_000, description="page number from 1")] = 1
    limit: Annotated[int, Meta(ge=1, le=catalog.MAX_LIMIT, description="page size")] = 20


def _sku(sku: NewSku | SkuChange) -> SkuInput:
    return SkuInput(
        price=or_none(sku.price),
        stock=or_none(sku.stock),
        attributes=or_none(sku.attributes),
        code=or_none(sku.code),
        id=sku.id if isinstance(sku, SkuChange) and sku.id is not UNSET else None,
    )


async def list_products(request: web.Request) -> web.Response:
    q = read_query(request, ProductList)
    if q.price_min is not None and q.price_max is not None and q.price_min > q.price_max:
        raise E.ValidationFailed(fields={"price_max": "must be >= price_min"})
    query = ProductQuery(
        category=q.category or None,
        price_min=q.price_min,
        price_max=q.price_max,
        q=q.q or None,
        sort=q.sort,
        page=q.page,
        limit=q.limit,
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
    body = await read_body(request, NewProduct)
    # its alternatives: skus without price or stock, or price (and stock) without skus
    if body.skus is not UNSET:
        skus = [_sku(sku) for sku in body.skus]
    else:
        assert body.price is not UNSET
        skus = [SkuInput(price=body.price, stock=0 if body.stock is UNSET else body.stock)]
    pool = request.app[appkeys.DB]
    pid = await catalog.create_product(
        pool,
        principal,
        name=body.name,
        description=body.description,
        category_id=or_none(body.category_id),
        images=body.images,
        attributes=body.attributes,
        skus=skus,
        max_per_user=or_none(body.max_per_user),
    )
    detail = await catalog.load_detail(pool, pid)
    return ok(detail, status=201, message="created")


async def update_product(request: web.Request, principal: Principal) -> web.Response:
    product_id = path_int(request.match_info["id"], "product")
    body = await read_body(request, ProductChange)
    skus = [] if body.skus is UNSET else [_sku(sku) for sku in body.skus]
    flat = (
        SkuInput(price=or_none(body.price), stock=or_none(body.stock))
        if body.price is not UNSET or body.stock is not UNSET
        else None
    )
    names = ("name", "description", "category_id", "images", "attributes", "status", "max_per_user")
    given = as_dict(body)
    fields: dict[str, Any] = {k: given[k] for k in names if k in given}
    pool, redis = request.app[appkeys.DB], request.app[appkeys.REDIS]
    version = await catalog.update_product(
        pool, redis, principal, product_id, fields, skus, version=or_none(body.version), flat=flat
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


class ProductDetail(Answer, tag_field="status", tag="on_sale"):
    """An on-sale product (only those have a detail)."""

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
    sales: int
    max_per_user: int | None
    version: int
    created_at: str
    updated_at: str


class ProductOffSale(Answer, tag_field="status", tag="off_sale"):
    """A product an update took off sale: its id and new version."""

    id: int
    version: int


class ProductRemoved(Answer):
    id: int
    status: Literal["off_sale"]


class Category(Answer):
    id: int
    name: str
    parent_id: int | None
    children: list[Category]


route = partial(Route, tag="catalog")
merchant_route = partial(Route, auth="merchant", tag="catalog")
ROUTES = [
    route(
        "GET",
        "/api/v1/products",
        list_products,
        "List and search on-sale products",
        query=ProductList,
        rules="price_max >= price_min",
        answer=ProductPage,
    ),
    route(
        "GET",
        "/api/v1/products/{id}",
        get_product,
        "Product detail with SKUs and category path (cached)",
        answer=ProductDetail,
    ),
    route(
        "GET",
        "/api/v1/categories",
        categories,
        "The category tree",
        answer=list[Category],
    ),
    merchant_route(
        "POST",
        "/api/v1/products",
        create_product,
        "Create a product with its SKUs (or flat price/stock = one SKU)",
        body=NewProduct,
        success={201: "created"},
        answer=ProductDetail,
    ),
    merchant_route(
        "PUT",
        "/api/v1/products/{id}",
        update_product,
        "Update a product and its SKUs (own products; admin any)",
        body=ProductChange,
        responses=(E.VersionConflict, E.StockBelowReserved, E.ProductInUse),
        answer=ProductDetail | ProductOffSale,
    ),
    merchant_route(
        "DELETE",
        "/api/v1/products/{id}",
        delete_product,
        "Take a product off sale (own products; admin any)",
        responses=(E.ProductInUse,),
        answer=ProductRemoved,
    ),
]
