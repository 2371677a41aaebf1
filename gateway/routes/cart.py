"""Cart (seed 000 §4): items, guest carts under ``X-Cart-Token``, checkout preview and checkout.

A request with a bearer token works on the user's cart; without one, on the guest
cart named by the ``X-Cart-Token`` header. Guest responses always carry the
(possibly new) token back in that header. Checkout needs a logged-in user.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated, Any, cast

import asyncpg
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import cart, coupons, orders
from flashsale.auth import Principal
from flashsale.errors import (
    CartFull,
    CouponNotApplicable,
    IdempotencyInProgress,
    InsufficientStock,
    ItemUnavailable,
    NotFound,
    NotOnSale,
    PriceChanged,
    PurchaseLimitExceeded,
    ValidationFailed,
)
from gateway import appkeys
from gateway.http import header_text, ok
from gateway.routes.addresses import ADDRESS_ALTS, Address, AddressId, order_address
from gateway.routes.marketing import AppliedPromotion
from gateway.routes.orders import OrderCreated
from gateway.routes.payments import with_payment_page
from gateway.routing import Route
from gateway.shapes import NO_DATA, Answer, Body, or_none, read_body
from gateway.validation import Alt, path_int

MAX_SPEC_TEXT = 64
Id = Annotated[int, Meta(ge=1)]
CartItemIds = Annotated[list[int], Meta(max_length=cart.MAX_CART_ITEMS)]
CouponCode = Annotated[str, Meta(max_length=64)]


class AddItem(Body, kw_only=True):
    product_id: Id | UnsetType = UNSET
    sku_id: Id | UnsetType = UNSET
    quantity: Annotated[int, Meta(ge=1, le=cart.MAX_ITEM_QUANTITY)]
    specification: (
        Annotated[
            dict[str, Annotated[str, Meta(max_length=MAX_SPEC_TEXT)] | int | bool],
            Meta(max_length=20),
        ]
        | UnsetType
        | None
    ) = UNSET
    alternatives = (Alt(("product_id",)), Alt(("sku_id",)))


class UpdateItem(Body):
    quantity: Annotated[int, Meta(ge=0, le=cart.MAX_ITEM_QUANTITY)] | UnsetType = UNSET
    selected: bool | UnsetType = UNSET
    alternatives = (Alt(("quantity",)), Alt(("selected",)))


class Preview(Body):
    selected_items: CartItemIds | UnsetType | None = UNSET
    shipping_address: Address | UnsetType | None = UNSET
    shipping_address_id: Id | UnsetType | None = UNSET
    coupon_code: CouponCode | UnsetType | None = UNSET


class Checkout(Body):
    selected_items: CartItemIds | UnsetType | None = UNSET
    # the one address schema, as POST /orders: inline, or an address book entry
    shipping_address: Address | UnsetType = UNSET
    address_id: AddressId | UnsetType = UNSET
    coupon_code: CouponCode | UnsetType | None = UNSET
    alternatives = ADDRESS_ALTS


IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LEN = 128
_TOKEN_RE = re.compile(cart.TOKEN_PATTERN)


def _owner(request: web.Request, principal: Principal | None) -> cart.CartOwner:
    if principal is not None:
        return cart.CartOwner(user_id=principal.user_id)
    token = request.headers.get(cart.CART_TOKEN_HEADER, "")
    return cart.CartOwner(guest_token=token if _TOKEN_RE.fullmatch(token) else None)


def _headers(owner: cart.CartOwner) -> dict[str, str] | None:
    return None if owner.guest_token is None else {cart.CART_TOKEN_HEADER: owner.guest_token}


async def add_item(request: web.Request, principal: Principal | None) -> web.Response:
    owner = _owner(request, principal)
    body = await read_body(request, AddItem)  # its alternatives: product_id or sku_id
    spec = or_none(body.specification) or {}
    if any(
        len(k) > MAX_SPEC_TEXT or not isinstance(v, str | int) or len(str(v)) > MAX_SPEC_TEXT
        for k, v in spec.items()
    ):
        raise ValidationFailed(
            fields={"specification": f"must map names to strings or numbers of <= {MAX_SPEC_TEXT}"}
        )
    data, owner = await cart.add_item(
        request.app[appkeys.DB],
        owner,
        product_id=or_none(body.product_id),
        sku_id=or_none(body.sku_id),
        quantity=body.quantity,
        specification=spec,
    )
    return ok(data, message="added to cart", headers=_headers(owner))


async def get_cart(request: web.Request, principal: Principal | None) -> web.Response:
    owner = _owner(request, principal)
    data = await cart.get_cart(request.app[appkeys.DB], owner)
    return ok(data, headers=_headers(owner))


async def update_item(request: web.Request, principal: Principal | None) -> web.Response:
    owner = _owner(request, principal)
    item_id = path_int(request.match_info["item_id"], "cart item")
    body = await read_body(request, UpdateItem)  # its alternatives: quantity or selected
    data = await cart.update_item(
        request.app[appkeys.DB],
        owner,
        item_id,
        quantity=or_none(body.quantity),
        selected=or_none(body.selected),
    )
    return ok(
        data,
        message="cart item removed" if data["removed"] else "cart item updated",
        headers=_headers(owner),
    )


async def delete_item(request: web.Request, principal: Principal | None) -> web.Response:
    owner = _owner(request, principal)
    item_id = path_int(request.match_info["item_id"], "cart item")
    await cart.remove_item(request.app[appkeys.DB], owner, item_id)
    return ok(None, message="cart item removed", headers=_headers(owner))


async def clear_cart(request: web.Request, principal: Principal | None) -> web.Response:
    owner = _owner(request, principal)
    await cart.clear(request.app[appkeys.DB], owner)
    return ok(None, message="cart cleared", headers=_headers(owner))


async def merge(request: web.Request, principal: Principal) -> web.Response:
    merged = await cart.merge_guest_cart(
        request.app[appkeys.DB], principal.user_id, request.headers.get(cart.CART_TOKEN_HEADER)
    )
    return ok({"merged_items": merged})


async def preview(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, Preview)
    async with request.app[appkeys.DB].acquire() as conn:
        selection = await cart.select_items(conn, principal.user_id, or_none(body.selected_items))
        priced = await coupons.quote(
            cast(asyncpg.Connection, conn),
            user_id=principal.user_id,
            lines=selection.lines,
            coupon_code=or_none(body.coupon_code),
        )
        offers = await coupons.available_for_lines(
            conn, user_id=principal.user_id, lines=selection.lines
        )
    return ok(
        {
            "items": selection.items,
            "subtotal": priced.subtotal_cents,
            "shipping_fee": priced.shipping_cents,
            "discount": priced.discount_cents,
            "total": priced.total_cents,
            "coupon_code": priced.coupon_code,
            "promotions_applied": list(priced.promotions),
            "available_coupons": offers,
        }
    )


def _order_lines(selection: cart.Selection) -> list[orders.OrderLineRequest]:
    """One order line per SKU (cart items of one SKU with different specifications add up)."""
    by_sku: dict[int, list[int]] = {}
    for line in selection.lines:
        qty_price = by_sku.setdefault(line.sku_id, [0, line.unit_price_cents])
        qty_price[0] += line.quantity
    return [
        orders.OrderLineRequest(sku_id, qty, expected_price_cents=price)
        for sku_id, (qty, price) in by_sku.items()
    ]


async def checkout(request: web.Request, principal: Principal) -> web.Response:
    key = header_text(request, IDEMPOTENCY_HEADER, max_len=MAX_IDEMPOTENCY_KEY_LEN)
    body = await read_body(request, Checkout)
    address = await order_address(
        request, principal.user_id, body.address_id, or_none(body.shipping_address)
    )
    pool = request.app[appkeys.DB]
    previous = await cart.previous_checkout(pool, principal.user_id, key)
    if previous is not None:
        return ok(previous, status=201, message="order created")
    async with pool.acquire() as conn:
        selection = await cart.select_items(conn, principal.user_id, or_none(body.selected_items))
    unavailable = [i["cart_item_id"] for i in selection.items if not i["available"]]
    if unavailable:
        raise ItemUnavailable(data={"cart_item_ids": unavailable})
    # The cart generation is the order's idempotency key (the client's key only names the
    # stored result): concurrent checkouts of one cart make one order.
    result = await orders.create_order(
        request.app[appkeys.DB],
        request.app[appkeys.SETTINGS],
        request.app[appkeys.ORDER_IDS],
        user_id=principal.user_id,
        lines=_order_lines(selection),
        shipping_address=address,
        coupon_code=or_none(body.coupon_code),
        idempotency_key=selection.order_key,
    )
    with_payment_page(request.app, result)
    if result.pop("idempotent_replay", False):
        return ok(result, message="order exists")
    # only after the order exists: a failed checkout leaves the cart as it was
    await cart.finish_checkout(
        pool, selection, user_id=principal.user_id, idempotency_key=key, result=result
    )
    return ok(result, status=201, message="order created")


_CART_RESPONSES = (NotFound, ValidationFailed)


class CartProduct(Answer):
    id: int
    name: str
    price: int
    image: str | None


class CartLine(Answer):
    cart_item_id: int
    product: CartProduct
    sku_id: int
    sku_attributes: Any
    quantity: int
    specification: Any
    subtotal: int
    available: bool
    selected: bool


class CartSummary(Answer):
    total_items: int
    total_quantity: int
    total_amount: int
    selected_amount: int


class CartView(Answer):
    items: list[CartLine]
    summary: CartSummary


class CartItemAdded(Answer):
    cart_item_id: int
    sku_id: int
    quantity: int
    total_items: int
    total_quantity: int


class CartItemChanged(Answer):
    """The item after the change; only ``cart_item_id`` and ``removed`` when it was removed
    (quantity 0)."""

    cart_item_id: int
    removed: bool
    quantity: int | UnsetType = UNSET
    selected: bool | UnsetType = UNSET


class CartMerged(Answer):
    merged_items: int


class CouponOffer(Answer):
    """A coupon the caller holds, judged against the selected items (``reason``: why not)."""

    code: str
    name: str
    applicable: bool
    discount_amount: int
    reason: str | None


class CheckoutPreview(Answer):
    """The selected items priced (cents): promotions and the coupon sent, if any."""

    items: list[CartLine]
    subtotal: int
    shipping_fee: int
    discount: int
    total: int
    coupon_code: str | None
    promotions_applied: list[AppliedPromotion]
    available_coupons: list[CouponOffer]


route = partial(Route, tag="cart")
ROUTES = [
    route(
        "POST",
        "/api/v1/cart/items",
        add_item,
        "Add a SKU to the cart (same SKU and specification add up)",
        auth="optional",
        body=AddItem,
        responses=(*_CART_RESPONSES, NotOnSale, InsufficientStock, CartFull),
        answer=CartItemAdded,
    ),
    route(
        "GET",
        "/api/v1/cart",
        get_cart,
        "The cart with its summary",
        auth="optional",
        responses=_CART_RESPONSES,
        answer=CartView,
    ),
    route(
        "PUT",
        "/api/v1/cart/items/{item_id}",
        update_item,
        "Change quantity (0 removes) or selection",
        auth="optional",
        body=UpdateItem,
        responses=_CART_RESPONSES,
        answer=CartItemChanged,
    ),
    route(
        "DELETE",
        "/api/v1/cart/items/{item_id}",
        delete_item,
        "Remove a cart item",
        auth="optional",
        responses=_CART_RESPONSES,
        answer=NO_DATA,
    ),
    route(
        "DELETE",
        "/api/v1/cart",
        clear_cart,
        "Empty the cart",
        auth="optional",
        responses=_CART_RESPONSES,
        answer=NO_DATA,
    ),
    route(
        "POST",
        "/api/v1/cart/merge",
        merge,
        "Merge the guest cart of X-Cart-Token into the user's cart (login does this too)",
        auth="user",
        answer=CartMerged,
    ),
    route(
        "POST",
        "/api/v1/cart/checkout/preview",
        preview,
        "Price the selected items: subtotal, shipping, discount, total, coupons",
        auth="user",
        body=Preview,
        responses=(*_CART_RESPONSES, CouponNotApplicable),
        answer=CheckoutPreview,
    ),
    route(
        "POST",
        "/api/v1/cart/checkout",
        checkout,
        "Create an order from the selected items and remove them from the cart",
        auth="user",
        body=Checkout,
        success={
            200: "order exists (a concurrent checkout of this cart made it)",
            201: "order created; payment information",
        },
        responses=(
            *_CART_RESPONSES,
            ItemUnavailable,
            PriceChanged,
            IdempotencyInProgress,
            PurchaseLimitExceeded,
            CouponNotApplicable,
        ),
        answer=OrderCreated,
    ),
]
