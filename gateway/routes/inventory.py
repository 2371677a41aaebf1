"""Inventory API (seed 000 §6.3): stock view, reserve, consume, release."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import errors as E
from flashsale import inventory
from flashsale.auth import Principal
from gateway import appkeys
from gateway.http import ok
from gateway.routing import Route
from gateway.shapes import Answer, Body, read_body
from gateway.validation import path_int

ReservationId = Annotated[str, Meta(min_length=1, max_length=64)]


class ReserveBody(Body, kw_only=True):
    sku_id: Annotated[int, Meta(ge=1)] | UnsetType = UNSET  # the product's one SKU
    quantity: Annotated[int, Meta(ge=1, le=10_000)]
    order_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    expires_in: Annotated[int, Meta(ge=1, le=7 * 24 * 3600)] = 900


class ConsumeBody(Body):
    reservation_id: ReservationId
    actual_quantity: Annotated[int, Meta(ge=0, le=10_000)] | UnsetType = UNSET  # default: all


class ReleaseBody(Body):
    reservation_id: ReservationId


SQL_PRODUCT = "SELECT merchant_id FROM products WHERE id = $1"
SQL_PRODUCT_SKUS = "SELECT id FROM skus WHERE product_id = $1 ORDER BY id"


async def _manage(request: web.Request, principal: Principal) -> tuple[int, Principal]:
    """The product id, checked to be managed by the caller (its merchant, or an admin)."""
    product_id = path_int(request.match_info["id"])
    merchant_id = await request.app[appkeys.DB].fetchval(SQL_PRODUCT, product_id)
    if merchant_id is None:
        raise E.NotFound("product not found")
    if principal.role != "admin" and merchant_id != principal.user_id:
        raise E.Forbidden("not your product")
    return product_id, principal


async def stock(request: web.Request) -> web.Response:
    product_id = path_int(request.match_info["id"])
    async with request.app[appkeys.DB].acquire() as conn:
        return ok(await inventory.product_stock(conn, product_id))


async def reserve(request: web.Request, principal: Principal) -> web.Response:
    product_id, _ = await _manage(request, principal)
    body = await read_body(request, ReserveBody)
    pool = request.app[appkeys.DB]
    skus = [r["id"] for r in await pool.fetch(SQL_PRODUCT_SKUS, product_id)]
    sku_id = body.sku_id
    if sku_id is UNSET:
        if len(skus) != 1:
            raise E.ValidationFailed(fields={"sku_id": "required: the product has several SKUs"})
        sku_id = skus[0]
    elif sku_id not in skus:
        raise E.NotFound("sku not found for this product")
    async with pool.acquire() as conn, conn.transaction():
        held = await inventory.merchant_reserve(
            conn,
            sku_id=sku_id,
            quantity=body.quantity,
            order_id=body.order_id,
            ttl_s=body.expires_in,
        )
    return ok(held.public(), status=201, message="reserved")


async def _own_reservation(
    request: web.Request, product_id: int, reservation_id: str
) -> dict[str, object]:
    async with request.app[appkeys.DB].acquire() as conn:
        held = await inventory.get_reservation(conn, reservation_id)
    if held is None or held["product_id"] != product_id:
        raise E.NotFound("reservation not found")
    return held


async def consume(request: web.Request, principal: Principal) -> web.Response:
    product_id, _ = await _manage(request, principal)
    body = await read_body(request, ConsumeBody)
    held = await _own_reservation(request, product_id, body.reservation_id)
    quantity = held["quantity"]
    assert isinstance(quantity, int)
    actual = quantity if body.actual_quantity is UNSET else body.actual_quantity
    if actual > quantity:
        raise E.ValidationFailed(fields={"actual_quantity": f"must be <= {quantity}"})
    async with request.app[appkeys.DB].acquire() as conn, conn.transaction():
        done = await inventory.consume_paid(conn, held, actual)
    if not done:
        raise E.ReservationNotActive(f"reservation is {held['status']}")
    return ok(
        {
            "reservation_id": body.reservation_id,
            "consumed_quantity": actual,
            "released_quantity": quantity - actual,
            "status": "consumed",
        }
    )


async def release(request: web.Request, principal: Principal) -> web.Response:
    product_id, _ = await _manage(request, principal)
    body = await read_body(request, ReleaseBody)
    held = await _own_reservation(request, product_id, body.reservation_id)
    async with request.app[appkeys.DB].acquire() as conn, conn.transaction():
        done = await inventory.release_unowned(conn, held, reason="api")
    if not done:
        raise E.ReservationNotActive(f"reservation is {held['status']}")
    return ok(
        {
            "reservation_id": body.reservation_id,
            "released_quantity": held["quantity"],
            "status": "released",
        }
    )


StockStatus = Literal["out_of_stock", "low", "sufficient"]


class SkuStock(Answer):
    sku_id: int
    code: str | None
    attributes: dict[str, Any]
    available_stock: int
    reserved_stock: int
    total_stock: int
    sold: int
    status: StockStatus


class ProductStock(Answer):
    """A product's stock: the sums over its SKUs, and each SKU."""

    product_id: int
    available_stock: int
    reserved_stock: int
    total_stock: int
    status: StockStatus
    skus: list[SkuStock]


class Reserved(Answer):
    reservation_id: str
    sku_id: int
    order_id: str | None
    reserved_quantity: int
    expires_at: str


class Consumed(Answer):
    reservation_id: str
    consumed_quantity: int
    released_quantity: int
    status: Literal["consumed"]


class Released(Answer):
    reservation_id: str
    released_quantity: int
    status: Literal["released"]


route = partial(Route, tag="inventory")
merchant_route = partial(Route, auth="merchant", tag="inventory")
ROUTES = [
    route(
        "GET",
        "/api/v1/products/{id}/stock",
        stock,
        "Stock of a product: available, reserved and total per SKU",
        answer=ProductStock,
    ),
    merchant_route(
        "POST",
        "/api/v1/products/{id}/reserve",
        reserve,
        "Reserve stock of a SKU until expires_in seconds from now (with order_id: only an "
        "unpaid order holding this SKU, up to what its line still needs)",
        body=ReserveBody,
        success={201: "reserved"},
        responses=(E.InsufficientStock, E.OrderNotPending, E.HoldExceedsOrder),
        answer=Reserved,
    ),
    merchant_route(
        "POST",
        "/api/v1/products/{id}/consume",
        consume,
        "Consume a reservation of a paid order (units become sold; the rest is released)",
        body=ConsumeBody,
        responses=(E.ReservationNotActive, E.OrderNotPaid),
        answer=Consumed,
    ),
    merchant_route(
        "POST",
        "/api/v1/products/{id}/release",
        release,
        "Release a reservation before it expires (not one of an unpaid order)",
        body=ReleaseBody,
        responses=(E.ReservationNotActive, E.HeldByOrder),
        answer=Released,
    ),
]
