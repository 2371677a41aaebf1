"""Coupons and amount-off promotions (seed 000 §7.2–7.3); admin creation of both."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from flashsale import coupons, promotions
from flashsale.auth import Principal
from flashsale.errors import CouponExists, CouponNotFound, Forbidden, ValidationFailed
from gateway import appkeys
from gateway.http import ok, read_json
from gateway.routing import Route
from gateway.validation import F, validate, validate_query

MAX_CENTS = 10**12

COUPON_USE = {
    "coupon_code": F(str, min_len=1, max_len=64),
    "order_amount": F(int, min=0, max=MAX_CENTS),
    "product_categories": F(
        list, required=False, nullable=True, max_len=100, items=(F(int), F(str, max_len=100))
    ),
    "product_ids": F(list, required=False, nullable=True, items=int, max_len=100),
}
NEW_COUPON = {
    "code": F(str, pattern=r"[A-Za-z0-9_-]{3,32}"),
    "name": F(str, min_len=1, max_len=100),
    "type": F(str, choices=coupons.COUPON_TYPES),
    "amount_off": F(int, required=False, nullable=True, min=1, max=MAX_CENTS),
    "percent_off": F(int, required=False, nullable=True, min=1, max=100),
    "max_discount": F(int, required=False, nullable=True, min=1, max=MAX_CENTS),
    "min_amount": F(int, default=0, min=0, max=MAX_CENTS),
    "scope": F(str, default="all", choices=coupons.COUPON_SCOPES),
    "category_ids": F(list, default=[], items=int, max_len=100),
    "product_ids": F(list, default=[], items=int, max_len=100),
    "valid_from": F(datetime),
    "valid_until": F(datetime),
    "max_uses_per_user": F(int, default=1, min=1, max=1000),
    "total_quantity": F(int, required=False, nullable=True, min=0, max=10**9),
}
RULE = {
    "min_amount": F(int, min=1, max=MAX_CENTS),
    "discount_amount": F(int, min=1, max=MAX_CENTS),
}
NEW_PROMOTION = {
    "name": F(str, min_len=1, max_len=100),
    "rules": F(list, min_len=1, max_len=20, items=F(dict, fields=RULE)),
    "category_ids": F(list, default=[], items=int, max_len=100),
    "valid_from": F(datetime),
    "valid_until": F(datetime),
}
CALC_ITEM = {
    "product_id": F(int, min=1),
    "category": F(str, required=False, nullable=True, max_len=100),
    "category_id": F(int, required=False, nullable=True, min=1),
    "price": F(int, min=0, max=MAX_CENTS),
    "quantity": F(int, min=1, max=10_000),
}
CALCULATE = {"items": F(list, min_len=1, max_len=200, items=F(dict, fields=CALC_ITEM))}
AVAILABLE_QUERY = {
    "amount": F(
        int,
        required=False,
        min=0,
        max=MAX_CENTS,
        doc="order amount in cents: adds applicable and discount_amount",
    )
}


def _check_window(body: dict[str, Any]) -> None:
    if body["valid_until"] <= body["valid_from"]:
        raise ValidationFailed(fields={"valid_until": "must be after valid_from"})


async def available_coupons(request: web.Request, principal: Principal) -> web.Response:
    amount = validate_query(request.query, AVAILABLE_QUERY).get("amount")
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.available(conn, user_id=principal.user_id, amount_cents=amount)
    return ok(data)


async def use_coupon(request: web.Request, principal: Principal) -> web.Response:
    body = validate(await read_json(request), COUPON_USE)
    categories = body.get("product_categories") or []
    if any(isinstance(c, bool) or not isinstance(c, int | str) for c in categories):
        raise ValidationFailed(fields={"product_categories": "items must be names or ids"})
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.check_use(
            conn,
            user_id=principal.user_id,
            code=body["coupon_code"],
            order_amount_cents=body["order_amount"],
            categories=categories,
            product_ids=body.get("product_ids") or [],
        )
    return ok(data)


async def create_coupon(request: web.Request, principal: Principal) -> web.Response:
    body = validate(await read_json(request), NEW_COUPON)
    _check_window(body)
    errors: dict[str, str] = {}
    if body["type"] == "amount_off" and body.get("amount_off") is None:
        errors["amount_off"] = "is required for an amount_off coupon"
    if body["type"] == "percent_off" and body.get("percent_off") is None:
        errors["percent_off"] = "is required for a percent_off coupon"
    if body["scope"] == "categories" and not body["category_ids"]:
        errors["category_ids"] = "is required for scope categories"
    if body["scope"] == "products" and not body["product_ids"]:
        errors["product_ids"] = "is required for scope products"
    if errors:
        raise ValidationFailed(fields=errors)
    async with request.app[appkeys.DB].acquire() as conn:
        data = await coupons.create(conn, body)
    return ok(data, status=201, message="coupon created")


def _rules(raw: list[dict[str, Any]]) -> list[dict[str, int]]:
    rules: list[dict[str, int]] = []
    for i, rule in enumerate(raw):
        try:
            checked = validate(rule, RULE)
        except ValidationFailed as exc:
            raise ValidationFailed(
                fields={f"rules[{i}].{k}": v for k, v in (exc.fields or {}).items()}
            ) from None
        if checked["discount_amount"] > checked["min_amount"]:
            raise ValidationFailed(
                fields={f"rules[{i}].discount_amount": "must not exceed min_amount"}
            )
        rules.append(checked)
    if len({r["min_amount"] for r in rules}) != len(rules):
        raise ValidationFailed(fields={"rules": "two tiers have the same min_amount"})
    return sorted(rules, key=lambda r: r["min_amount"])


async def create_promotion(request: web.Request, principal: Principal) -> web.Response:
    body = validate(await read_json(request), NEW_PROMOTION)
    _check_window(body)
    rules = _rules(body["rules"])
    async with request.app[appkeys.DB].acquire() as conn:
        data = await promotions.create(
            conn,
            name=body["name"],
            rules=rules,
            category_ids=body["category_ids"],
            starts_at=body["valid_from"],
            ends_at=body["valid_until"],
        )
    return ok(data, status=201, message="promotion created")


async def list_promotions(request: web.Request) -> web.Response:
    async with request.app[appkeys.DB].acquire() as conn:
        data = await promotions.list_active(conn, datetime.now(UTC))
    return ok(data)


async def calculate(request: web.Request) -> web.Response:
    body = validate(await read_json(request), CALCULATE)
    items: list[dict[str, Any]] = []
    for i, raw in enumerate(body["items"]):
        try:
            items.append(validate(raw, CALC_ITEM))
        except ValidationFailed as exc:
            raise ValidationFailed(
                fields={f"items[{i}].{k}": v for k, v in (exc.fields or {}).items()}
            ) from None
    async with request.app[appkeys.DB].acquire() as conn:
        by_name = await promotions.category_ids_by_name(
            conn, [it["category"] for it in items if it.get("category")]
        )
        of_product = await promotions.product_categories(conn, [it["product_id"] for it in items])
        calc = []
        for i, it in enumerate(items):
            # the catalog's category wins; the client's hint only prices unknown products
            category = (
                of_product.get(it["product_id"])
                or it.get("category_id")
                or by_name.get(it.get("category") or "")
            )
            calc.append(promotions.CalcItem(i, category, it["price"] * it["quantity"]))
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


ROUTES = [
    Route(
        "GET",
        "/api/v1/coupons/available",
        available_coupons,
        "Coupons the current user can use now",
        auth="user",
        query=AVAILABLE_QUERY,
        tag="marketing",
    ),
    Route(
        "POST",
        "/api/v1/coupons/use",
        use_coupon,
        "Evaluate a coupon for an amount (a use is consumed only by an order)",
        auth="user",
        body=COUPON_USE,
        responses=(CouponNotFound, ValidationFailed),
        tag="marketing",
    ),
    Route(
        "POST",
        "/api/v1/admin/coupons",
        create_coupon,
        "Create a coupon",
        auth="admin",
        body=NEW_COUPON,
        rules="valid_until after valid_from; amount_off or percent_off as the type needs; "
        "category_ids or product_ids as the scope needs",
        success={201: "created"},
        responses=(Forbidden, CouponExists, ValidationFailed),
        tag="marketing",
    ),
    Route(
        "GET",
        "/api/v1/promotions/amount-off",
        list_promotions,
        "Running tiered amount-off promotions",
        tag="marketing",
    ),
    Route(
        "POST",
        "/api/v1/promotions/calculate",
        calculate,
        "Best combination of amount-off promotions for some items",
        body=CALCULATE,
        responses=(ValidationFailed,),
        tag="marketing",
    ),
    Route(
        "POST",
        "/api/v1/admin/promotions",
        create_promotion,
        "Create a tiered promotion",
        auth="admin",
        body=NEW_PROMOTION,
        rules="valid_until after valid_from; each discount_amount <= its min_amount; "
        "distinct min_amount",
        success={201: "created"},
        responses=(Forbidden, ValidationFailed),
        tag="marketing",
    ),
]
