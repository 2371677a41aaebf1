"""The back office: a merchant's orders (list, detail, CSV rows, bulk shipping) and the
admin's order search.

A merchant sees the orders that hold at least one of its products, and of those only its
own lines (``merchant_orders`` keeps one row per merchant and order, with the merchant's
units and amount, maintained by triggers: see migration 0060). Another merchant's order
is a 404, never a 403, so order ids of other shops do not leak.

Lists page through an index: the WHERE clause is assembled from fixed fragments (never
from client text; every value is a bind parameter) so that each combination of filters
gets a plan that uses ``(merchant_id, status, created_at)`` (``(status, created_at)`` for
the admin's), and the total is counted from the same index alone. A list of every status
reads that index once per status, the page's rows plus the ones before them from each,
and keeps the newest (or oldest): no index by date alone, because each one is paid by
every flash order the consumer writes (~90 B of WAL, and its CPU, per index per order;
``python -m loadtests.price_drain``), while a list page of eight statuses costs eight
short index reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

import asyncpg

from flashsale.errors import AppError, NotFound
from flashsale.orders.model import ALL_STATUSES, SQL_ORDER, Actor
from flashsale.orders.states import ship_order
from flashsale.orders.views import (
    SQL_ITEMS,
    SQL_LOGS,
    item_view,
    order_amounts,
    order_detail,
    order_head,
    returns_of_order,
    shipping_info,
)
from flashsale.paging import offset, page_of
from flashsale.stores.db import Conn

MAX_EXPORT_ROWS: Final = 10_000
# A merchant sees a buyer's name, phone and address only on an order it must ship (paid,
# nothing refunded) or has shipped (the history of a delivery): not on an unpaid, cancelled
# or refunded one.
CONTACT_STATUSES: Final = ("paid", "shipped", "delivered", "completed")
CONTACT_FIELDS: Final = (
    "name",
    "phone",
    "address",
    "region",
    "city",
    "detail",
    "postcode",
    "address_id",
)
MAX_BULK_SHIP: Final = 100
# Both read an index forwards or backwards (an amount sort would need one more index on
# merchant_orders, paid by every flash order the consumer writes).
SORTS: Final = ("created_at,desc", "created_at,asc")
_ORDER_BY: Final = {
    "created_at,desc": "mo.created_at DESC, mo.order_id DESC",
    "created_at,asc": "mo.created_at, mo.order_id",
}
_ADMIN_ORDER_BY: Final = {
    "created_at,desc": "created_at DESC, id DESC",
    "created_at,asc": "created_at, id",
}
# OrderQuery field → SQL fragment with ``{}`` for its parameter number
_MERCHANT_FILTERS: Final = {
    "status": "mo.status = ${}",
    "date_from": "mo.created_at >= ${}",
    "date_to": "mo.created_at < ${}",
    "order_id": "mo.order_id = ${}",
    "product_id": (
        "EXISTS (SELECT 1 FROM order_items oi WHERE oi.order_id = mo.order_id "
        "AND oi.product_id = ${})"
    ),
}
_ADMIN_FILTERS: Final = {
    "status": "status = ${}",
    "date_from": "created_at >= ${}",
    "date_to": "created_at < ${}",
    "order_id": "id = ${}",
    "user_id": "user_id = ${}",
}
_MERCHANT_COLUMNS: Final = """mo.order_id, mo.created_at, mo.status, mo.user_id, mo.units,
       mo.amount_cents, o.kind, o.version, o.refunded_cents, o.shipping_address,
       o.shipping_company, o.tracking_number, o.estimated_delivery, o.shipped_at,
       o.delivered_at"""
_MERCHANT_ROW = """
SELECT {columns}
FROM merchant_orders mo JOIN orders o ON o.id = mo.order_id
WHERE mo.merchant_id = $1{where}
ORDER BY {order_by}
LIMIT ${limit} OFFSET ${offset}
"""
# Every status: each status's first (offset + limit) rows from the status index, merged.
_MERCHANT_ROW_BY_STATUS = """
SELECT {columns}
FROM unnest(${statuses}::text[]) AS s(status)
CROSS JOIN LATERAL (
    SELECT mo.* FROM merchant_orders mo
    WHERE mo.merchant_id = $1 AND mo.status = s.status{where}
    ORDER BY {order_by}
    LIMIT ${limit}::bigint + ${offset}::bigint
) mo
JOIN orders o ON o.id = mo.order_id
ORDER BY {order_by}
LIMIT ${limit} OFFSET ${offset}
"""
_MERCHANT_COUNT = "SELECT count(*) FROM merchant_orders mo WHERE mo.merchant_id = $1{where}"
_ADMIN_COLUMNS: Final = """id, user_id, kind, status, total_cents, discount_cents,
       shipping_cents, pay_cents, refunded_cents, version, created_at, paid_at, shipped_at,
       flash_sale_id, tracking_number"""
_ADMIN_ROW = """
SELECT {columns}
FROM orders WHERE true{where}
ORDER BY {order_by}
LIMIT ${limit} OFFSET ${offset}
"""
_ADMIN_ROW_BY_STATUS = """
SELECT o.*
FROM unnest(${statuses}::text[]) AS s(status)
CROSS JOIN LATERAL (
    SELECT {columns}
    FROM orders WHERE status = s.status{where}
    ORDER BY {order_by}
    LIMIT ${limit}::bigint + ${offset}::bigint
) o
ORDER BY {order_by}
LIMIT ${limit} OFFSET ${offset}
"""
_ADMIN_COUNT = "SELECT count(*) FROM orders WHERE true{where}"
SQL_MERCHANT_HAS = "SELECT 1 FROM merchant_orders WHERE merchant_id = $1 AND order_id = $2"
SQL_MERCHANT_ITEMS = """
SELECT oi.product_id, oi.sku_id, oi.quantity, oi.price_cents, oi.snapshot_id,
       sn.data AS snapshot
FROM order_items oi
JOIN products p ON p.id = oi.product_id
LEFT JOIN item_snapshots sn ON sn.id = oi.snapshot_id
WHERE oi.order_id = $1 AND p.merchant_id = $2
ORDER BY oi.id
"""
SQL_EXPORT_ITEMS = """
SELECT oi.order_id, oi.sku_id, oi.quantity
FROM order_items oi JOIN products p ON p.id = oi.product_id
WHERE oi.order_id = ANY($1::text[]) AND p.merchant_id = $2
ORDER BY oi.order_id, oi.id
"""
SQL_PAYMENT_STATUS = """
SELECT status FROM pay_orders WHERE order_id = $1
ORDER BY (status = 'success') DESC, created_at DESC LIMIT 1
"""
SQL_USER_BY_LOGIN = "SELECT id FROM users WHERE email = $1 OR phone = $1"


@dataclass(frozen=True, slots=True)
class OrderQuery:
    """Filters, sort and page of a back-office order list (all optional but the page)."""

    status: str | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None
    order_id: str | None = None
    product_id: int | None = None
    user_id: int | None = None
    sort: str = "created_at,desc"
    page: int = 1
    limit: int = 20


def _where(q: OrderQuery, fragments: Mapping[str, str], first: int) -> tuple[str, list[Any]]:
    parts: list[str] = []
    args: list[Any] = []
    for name, fragment in fragments.items():
        value = getattr(q, name)
        if value is None:
            continue
        args.append(value)
        parts.append(" AND " + fragment.format(first + len(args) - 1))
    return "".join(parts), args


def shows_contact(order: asyncpg.Record) -> bool:
    """Whether the merchant of ``order`` (a row with ``status`` and ``refunded_cents``)
    may see where it goes and to whom."""
    status = order["status"]
    return status in CONTACT_STATUSES and not (status == "paid" and order["refunded_cents"])


def merchant_shipping_info(order: asyncpg.Record) -> dict[str, Any]:
    """:func:`shipping_info` without the buyer's contact unless :func:`shows_contact`."""
    info = shipping_info(order)
    if not shows_contact(order):
        info.update(dict.fromkeys(CONTACT_FIELDS))
    return info


def _list_sql(
    template: str,
    by_status: str | None,
    where: str,
    args: list[Any],
    page: tuple[int, int],
    *,
    first: int,
    **fmt: str,
) -> tuple[str, list[Any]]:
    """A list's statement and arguments: ``args`` (the filters' values, numbered from
    ``$first``), then the page's limit and offset, then, when ``by_status`` (the template
    that reads the status index once per status) is given, every status."""
    n = first + len(args)  # $n limit, $n+1 offset, $n+2 the statuses
    values = [*args, *page]
    if by_status is None:
        return template.format(where=where, limit=n, offset=n + 1, **fmt), values
    sql = by_status.format(where=where, limit=n, offset=n + 1, statuses=n + 2, **fmt)
    return sql, [*values, list(ALL_STATUSES)]


def merchant_list_sql(q: OrderQuery, *, limit: int, offset: int) -> tuple[str, list[Any]]:
    """The merchant list's statement and arguments after ``$1`` (the merchant id)."""
    where, args = _where(q, _MERCHANT_FILTERS, 2)
    # one status, or one order (the primary key): a plain read
    plain = q.status is not None or q.order_id is not None
    return _list_sql(
        _MERCHANT_ROW,
        None if plain else _MERCHANT_ROW_BY_STATUS,
        where,
        args,
        (limit, offset),
        first=2,
        columns=_MERCHANT_COLUMNS,
        order_by=_ORDER_BY[q.sort],
    )


def merchant_count_sql(q: OrderQuery) -> tuple[str, list[Any]]:
    """The merchant list's count and its arguments after ``$1`` (the merchant id)."""
    where, args = _where(q, _MERCHANT_FILTERS, 2)
    return _MERCHANT_COUNT.format(where=where), args


async def merchant_orders(pool: asyncpg.Pool, merchant_id: int, q: OrderQuery) -> dict[str, Any]:
    sql, args = merchant_list_sql(q, limit=q.limit, offset=offset(q.page, q.limit))
    count_sql, count_args = merchant_count_sql(q)
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, merchant_id, *args)
        total = await conn.fetchval(count_sql, merchant_id, *count_args)
    orders = [
        {
            "order_id": r["order_id"],
            "kind": r["kind"],
            "status": r["status"],
            "version": r["version"],
            "created_at": r["created_at"],
            "buyer_id": r["user_id"],
            "units": r["units"],
            "amount": r["amount_cents"],
            "refunded_amount": r["refunded_cents"],
            "has_address": r["shipping_address"] is not None,
            "shipping_info": merchant_shipping_info(r),
        }
        for r in rows
    ]
    return page_of("orders", orders, total=total, page=q.page, limit=q.limit, sort=q.sort)


async def merchant_export(
    pool: asyncpg.Pool, merchant_id: int, q: OrderQuery
) -> tuple[list[dict[str, Any]], bool]:
    """Rows of the CSV export (at most ``MAX_EXPORT_ROWS``; the flag says if more matched)."""
    sql, args = merchant_list_sql(q, limit=MAX_EXPORT_ROWS + 1, offset=0)
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, merchant_id, *args)
        truncated = len(rows) > MAX_EXPORT_ROWS
        rows = rows[:MAX_EXPORT_ROWS]
        lines: dict[str, list[str]] = {}
        for it in await conn.fetch(SQL_EXPORT_ITEMS, [r["order_id"] for r in rows], merchant_id):
            lines.setdefault(it["order_id"], []).append(f"{it['sku_id']}x{it['quantity']}")
    out = []
    for r in rows:
        address = (r["shipping_address"] if shows_contact(r) else None) or {}
        out.append(
            {
                "order_id": r["order_id"],
                "created_at": r["created_at"].isoformat(),
                "status": r["status"],
                "buyer_id": r["user_id"],
                "items": " ".join(lines.get(r["order_id"], [])),
                "units": r["units"],
                "amount_cents": r["amount_cents"],
                "refunded_cents": r["refunded_cents"],
                "name": address.get("name"),
                "phone": address.get("phone"),
                "address": address.get("address"),
                "postcode": address.get("postcode"),
                "shipping_company": r["shipping_company"],
                "tracking_number": r["tracking_number"],
                "shipped_at": r["shipped_at"].isoformat() if r["shipped_at"] else None,
            }
        )
    return out, truncated


async def _visible(conn: Conn, order_id: str, actor: Actor) -> asyncpg.Record:
    order = await conn.fetchrow(SQL_ORDER, order_id)
    if order is None or (
        actor.role != "admin"
        and await conn.fetchval(SQL_MERCHANT_HAS, actor.user_id, order_id) is None
    ):
        raise NotFound("order not found")
    return order


async def merchant_order(pool: asyncpg.Pool, order_id: str, actor: Actor) -> dict[str, Any]:
    """One order as its merchant sees it: its own lines, the address, tracking, payment
    status, returns and the operation log."""
    async with pool.acquire() as conn:
        order = await _visible(conn, order_id, actor)
        rows = (
            await conn.fetch(SQL_ITEMS, order_id)
            if actor.role == "admin"  # an admin sees every line
            else await conn.fetch(SQL_MERCHANT_ITEMS, order_id, actor.user_id)
        )
        items = [item_view(r) for r in rows]
        return {
            **order_head(order),
            "paid_at": order["paid_at"],
            "buyer_id": order["user_id"],
            "items": items,
            "amount": sum(i["subtotal"] for i in items),
            "refunded_amount": order["refunded_cents"],
            "payment_status": await conn.fetchval(SQL_PAYMENT_STATUS, order_id),
            "shipping_info": (
                shipping_info(order) if actor.role == "admin" else merchant_shipping_info(order)
            ),
            "returns": await returns_of_order(conn, order_id),
            "logs": [dict(r) for r in await conn.fetch(SQL_LOGS, order_id)],
        }


async def ship_many(
    pool: asyncpg.Pool, actor: Actor, shipments: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Ship each order on its own (one failure does not stop the others); one result per
    shipment, in order, with the error code of each refusal."""
    results: list[dict[str, Any]] = []
    for s in shipments:
        try:
            done = await ship_order(
                pool,
                s["order_id"],
                actor,
                expected_version=s.get("version"),
                shipping_company=s["shipping_company"],
                tracking_number=s["tracking_number"],
                estimated_delivery=s.get("estimated_delivery"),
            )
            results.append({"order_id": s["order_id"], "ok": True, **done})
        except AppError as exc:
            results.append(
                {"order_id": s["order_id"], "ok": False, "error": exc.code, "message": exc.message}
            )
    shipped = sum(1 for r in results if r["ok"])
    return {"shipped": shipped, "failed": len(results) - shipped, "results": results}


def admin_list_sql(q: OrderQuery) -> tuple[str, list[Any]]:
    """The admin list's statement and its arguments."""
    where, args = _where(q, _ADMIN_FILTERS, 1)
    # one status, one order or one buyer's (orders_user_idx, by date): a plain read
    plain = q.status is not None or q.order_id is not None or q.user_id is not None
    return _list_sql(
        _ADMIN_ROW,
        None if plain else _ADMIN_ROW_BY_STATUS,
        where,
        args,
        (q.limit, offset(q.page, q.limit)),
        first=1,
        columns=_ADMIN_COLUMNS,
        order_by=_ADMIN_ORDER_BY[q.sort],
    )


async def admin_orders(pool: asyncpg.Pool, q: OrderQuery, *, login: str | None) -> dict[str, Any]:
    """Every order, searched by id, buyer (id, or email/phone in ``login``), status and date."""
    async with pool.acquire() as conn:
        if login is not None:
            uid = await conn.fetchval(SQL_USER_BY_LOGIN, login)
            if uid is None or (q.user_id is not None and q.user_id != uid):
                return page_of("orders", [], total=0, page=q.page, limit=q.limit, sort=q.sort)
            q = replace(q, user_id=uid)
        sql, args = admin_list_sql(q)
        rows = await conn.fetch(sql, *args)
        where, count_args = _where(q, _ADMIN_FILTERS, 1)
        total = await conn.fetchval(_ADMIN_COUNT.format(where=where), *count_args)
    orders = [
        {
            "order_id": r["id"],
            "user_id": r["user_id"],
            "kind": r["kind"],
            "status": r["status"],
            **order_amounts(r),
            "refunded_amount": r["refunded_cents"],
            "version": r["version"],
            "created_at": r["created_at"],
            "paid_at": r["paid_at"],
            "shipped_at": r["shipped_at"],
            "tracking_number": r["tracking_number"],
            "flash_sale_id": r["flash_sale_id"],
        }
        for r in rows
    ]
    return page_of("orders", orders, total=total, page=q.page, limit=q.limit, sort=q.sort)


async def admin_order(pool: asyncpg.Pool, order_id: str) -> dict[str, Any]:
    """Any order in full, with its returns and operation log."""
    async with pool.acquire() as conn:
        order = await conn.fetchrow(SQL_ORDER, order_id)
        if order is None:
            raise NotFound("order not found")
        return {
            **await order_detail(conn, order),
            "user_id": order["user_id"],
            "logs": [dict(r) for r in await conn.fetch(SQL_LOGS, order_id)],
        }
