"""Coupons and amount-off promotions (seed 000 §7.2–7.3); admin creation of both."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, UnsetType

from flashsale import coupons, promotions
from flashsale.auth import Principal
from flashsale.errors import CouponExists, CouponNotFound, ValidationFailed
from gateway import appkeys
from gateway.http import ok
from gateway.routing import Route
from gateway.shapes import Answer, Body, Query, as_dict, one_of, read_body, read_query

MAX_CENTS = 10**12

Cents = Annotated[int, Meta(ge=0, le=MAX_CENTS)]
PositiveCents = Annotated[int, Meta(ge=1, le=MAX_CENTS)]
Ids = Annotated[list[int], Meta(max_length=100)]
Name = Annotated[str, Meta(min_length=1, max_length=100)]
CategoryName = Annotated[str, Meta(max_length=100)]


class CouponUse(Body):
    coupon_code: Annotated[str, Meta(min_length=1, max_length=64)]
    order_amount: Cents
    product_categories: Annotated[list[int | CategoryName], Meta(max_length=100)] | None = None
    product_ids: Ids | None = None


class NewCoupon(Body, kw_only=True):
    code: Annotated[str, Meta(pattern=r"[A-Za-z0-9_-]{3,32}")]
    name: Name
    type: Annotated[str, one_of(coupons.COUPON_TYPES)]
    amount_off: PositiveCents | None = None
    percent_off: Annotated[int, Meta(ge=1, le=100)] | None = None
    max_discount: PositiveCents | None = None
    min_amount: Cents = 0
    scope: Annotated[str, one_of(coupons.COUPON_SCOPES)] = "all"
    category_ids: Ids = msgspec.field(default_factory=list)
    product_ids: Ids = msgspec.field(default_factory=list)
    valid_from: datetime
    valid_until: datetime
    max_uses_per_user: Annotated[int, Meta(ge=1, le=1000)] = 1
    total_quantity: Annotated[int, Meta(ge=0, le=10**9)] | None = None


class Rule(Body):
    min_amount: PositiveCents
    discount_amount: PositiveCents


class NewPromotion(Body, kw_only=True):
    name: Name
    rules: Annotated[list[Rule], Meta(min_length=1, max_length=20)]
    category_ids: Ids = msgspec.field(default_factory=list)
    valid_from: datetime
    valid_until: datetime


class CalcItem(Body, kw_only=True):
    product_id: Annotated[int, Meta(ge=1)]
    category: CategoryName | None = None
    category_id: Annotated[int, Meta(ge=1)] | None = None
    price: Cents
    quantity: Annotated[int, Meta(ge=1, le=10_000)]


class Calculate(Body):
    items: Annotated[list[CalcItem], Meta(min_length=1, max_length=200)]


class AvailableQuery(Query):
    amount: (
        Annotated[
            Cents, Meta(description="order amount in cents: adds applicable and discount_amount")
        ]
        | None
    ) = None


class MinAmount(Answer):
    min_amount: int


class CouponDiscount(Answer):
    """By the coupon's type: ``amount`` (amount_off), ``percent`` and ``max_amount``
    (percent_off; null: no cap), or ``free_shipping`` (free_shipping)."""

    amount: int | UnsetType = UNSET
    percent: int | UnsetType = UNSET
    max_amount: int | UnsetType | None = UNSET
    free_shipping: bool | UnsetType = UNSET


class Coupon(Answer):
    """A coupon (money in cents); ``remaining_uses``: the caller's."""

    coupon_id: int
    code: str
    name: str
    type: Annotated[str, one_of(coupons.COUPON_TYPES)]
    condition: MinAmount
    discount: CouponDiscount
    scope: Annotated[str, one_of(coupons.COUPON_SCOPES)]
    valid_from: str
    valid_until: str
    applicable_categories: list[str]
    category_ids: list[int]
    product_ids: list[int]
    remaining_uses: int


class AvailableCoupon(Coupon):
    """With ``amount`` asked: whether the coupon applies to it, and why not."""

    applicable: bool | UnsetType = UNSET
    discount_amount: int | UnsetType = UNSET
    reason: str | UnsetType | None = UNSET


class CouponCheck(Answer):
    applicable: bool
    discount_amount: int
    free_shipping: bool
    final_amount: int
    coupon_used_id: None  # a use is recorded only by an order
    reason: str | None


class Tier(Answer):
    min_amount: int
    discount_amount: int


class Promotion(Answer):
    promotion_id: int
    name: str
    rules: list[Tier]
    valid_from: str
    valid_until: str
    category_ids: list[int]
    applicable_categories: list[str]


class AppliedPromotion(Answer):
    promotion_id: int
    discount_amount: int
    rule_matched: str
    rule: Tier


class PromotionsPriced(Answer):
    original_amount: int
    promotions_applied: list[AppliedPromotion]
    discount_amount: int
    final_amount: int


def _check_window(body: NewCoupon | NewPromotion) -> None:
    if body.valid_until <= body.valid_from:
        raise ValidationFailed(fields={"valid_until": "must be after valid_from"})


async def available_coupons(request: web.Request, principal: Principal) -> web.Response:
    amount = read_query(request, AvailableQuery).amount
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.available(conn, user_id=principal.user_id, amount_cents=amount)
    return ok(data)


async def use_coupon(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, CouponUse)
    categories = body.product_categories or []
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.check_use(
            conn,
            user_id=principal.user_id,
            code=body.coupon_code,
            order_amount_cents=body.order_amount,
            categories=categories,
            product_ids=body.product_ids or [],
        )
    return ok(data)


async def create_coupon(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, NewCoupon)
    _check_window(body)
    errors: dict[str, str] = {}
    if body.type == "amount_off" and body.amount_off is None:
        errors["amount_off"] = "is required for an amount_off coupon"
    if body.type == "percent_off" and body.percent_off is None:
        errors["percent_off"] = "is required for a percent_off coupon"
    if body.scope == "categories" and not body.category_ids:
        errors["category_ids"] = "is required for scope categories"
    if body.scope == "products" and not body.product_ids:
        errors["product_ids"] = "is required for scope products"
    if errors:
        raise ValidationFailed(fields=errors)
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.create(conn, as_dict(body))
    return ok(data, status=201, message="coupon created")


def _rules(given: list[Rule]) -> list[dict[str, int]]:
    for i, rule in enumerate(given):
        if rule.discount_amount > rule.min_amount:
            raise ValidationFailed(
                fields={f"rules[{i}].discount_amount": "must not exceed min_amount"}
            )
    if len({r.min_amount for r in given}) != len(given):
        raise ValidationFailed(fields={"rules": "two tiers have the same min_amount"})
    return sorted((as_dict(r) for r in given), key=lambda r: r["min_amount"])


async def create_promotion(request: web.Request, principal: Principal) -> web.Response:
    body = await read_body(request, NewPromotion)
    _check_window(body)
    rules = _rules(body.rules)
    async with request.app[appkeys.DB].acquire() as conn:
        data = await promotions.create(
            conn,
            name=body.name,
            rules=rules,
            category_ids=body.category_ids,
            starts_at=body.valid_from,
            ends_at=body.valid_until,
        )
    return ok(data, status=201, message="promotion created")


async def list_promotions(request: web.Request) -> web.Response:
    async with request.app[appkeys.DB].acquire() as conn:
        data = await promotions.list_active(conn, datetime.now(UTC))
    return ok(data)


async def calculate(request: web.Request) -> web.Response:
    items = (await read_body(request, Calculate)).items
    async with request.app[appkeys.DB].acquire() as conn:
        by_name = await promotions.category_ids_by_name(
            conn, [it.category for it in items if it.category]
        )
        of_product = await promotions.product_categories(conn, [it.product_id for it in items])
        calc = []
        for i, it in enumerate(items):
            # the catalog's category wins; the client's hint only prices unknown products
            category = (
                of_product.get(it.product_id) or it.category_id or by_name.get(it.category or "")
            )
            calc.append(promotions.CalcItem(i, category, it.price * it.quantity))
        applied = await promotions.discount_for(conn, calc, datetime.now(UTC))
    original = sum(c.amount_cents for c in calc)
    discount = min(sum(a.discount_cents for a in applied), original)
    return ok(
        {
            "original_amount": original,
            "promotions_applied": [a.public() for a in applied],
            "discount_amount": discount,
            "final_amount": original - discount,
        }
    )


route = partial(Route, tag="marketing")
ROUTES = [
    route(
        "GET",
        "/api/v1/coupons/available",
        available_coupons,
        "Coupons the current user can use now",
        auth="user",
        query=AvailableQuery,
        answer=list[AvailableCoupon],
    ),
    route(
        "POST",
        "/api/v1/coupons/use",
        use_coupon,
        "Evaluate a coupon for an amount (a use is consumed only by an order)",
        auth="user",
        body=CouponUse,
        responses=(CouponNotFound,),
        answer=CouponCheck,
    ),
    route(
        "POST",
        "/api/v1/admin/coupons",
        create_coupon,
        "Create a coupon",
        auth="admin",
        body=NewCoupon,
        rules="valid_until after valid_from; amount_off or percent_off as the type needs; "
        "category_ids or product_ids as the scope needs",
        success={201: "created"},
        responses=(CouponExists,),
        answer=Coupon,
    ),
    route(
        "GET",
        "/api/v1/promotions/amount-off",
        list_promotions,
        "Running tiered amount-off promotions",
        answer=list[Promotion],
    ),
    route(
        "POST",
        "/api/v1/promotions/calculate",
        calculate,
        "Best combination of amount-off promotions for some items",
        body=Calculate,
        answer=PromotionsPriced,
    ),
    route(
        "POST",
        "/api/v1/admin/promotions",
        create_promotion,
        "Create a tiered promotion",
        auth="admin",
        body=NewPromotion,
        rules="valid_until after valid_from; each discount_amount <= its min_amount; "
        "distinct min_amount",
        success={201: "created"},
        answer=Promotion,
    ),
]
