"""Returns and refunds after shipping.

The shopper asks, the merchant of the order's products (or an admin) decides::

    return_requested → return_approved → refunded     approve: the provider refund runs at
                                                      once (the sandbox completes it)
    return_requested → return_rejected                reject, with a note

``kind`` is ``return`` (the goods come back: their units go back on the SKU's shelf when
the return is approved) or ``refund`` (money only). A request names an amount (default:
everything not yet refunded) and, for a return, the lines coming back (default: all of
them). An order has at most one open request. Every step writes an ``order_logs`` row.

Locks: the order row first, then the return row (as every order change does: order, then
what hangs off it), so a repeated or concurrent approval waits, then finds the return
decided and changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from flashsale import inventory, payments
from flashsale.errors import NotFound, RefundExceedsPaid, ReturnInProgress, ValidationFailed
from flashsale.orders.model import SQL_ORDER_FOR_UPDATE, Actor, invalid_transition, write_log
from flashsale.orders.states import require_merchant
from flashsale.orders.views import RETURN_COLUMNS, return_view
from flashsale.paging import offset, page_of
from flashsale.stores.db import Conn

RETURNABLE: Final = ("shipped", "delivered", "completed")
KINDS: Final = ("return", "refund")
STATUSES: Final = ("return_requested", "return_approved", "return_rejected", "refunded")
OPEN: Final = "return_requested"

_COLUMNS = RETURN_COLUMNS
SQL_RETURN = f"SELECT {_COLUMNS} FROM order_returns WHERE id = $1"  # noqa: S608
SQL_RETURN_FOR_UPDATE = f"SELECT {_COLUMNS} FROM order_returns WHERE id = $1 FOR UPDATE"  # noqa: S608
SQL_OPEN_OF_ORDER = "SELECT id FROM order_returns WHERE order_id = $1 AND status = $2"
SQL_ORDER_LINES = """
SELECT oi.sku_id, sum(oi.quantity)::int AS quantity
FROM order_items oi WHERE oi.order_id = $1 GROUP BY oi.sku_id ORDER BY oi.sku_id
"""
SQL_RETURNED_UNITS = """
SELECT (i ->> 'sku_id')::bigint AS sku_id, sum((i ->> 'quantity')::int)::int AS quantity
FROM order_returns r, jsonb_array_elements(r.items) i
WHERE r.order_id = $1 AND r.status IN ('return_requested', 'return_approved', 'refunded')
GROUP BY 1
"""
SQL_INSERT = f"""
INSERT INTO order_returns (id, order_id, user_id, kind, reason, amount_cents, items)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {_COLUMNS}
"""  # noqa: S608
SQL_DECIDE = f"""
UPDATE order_returns
SET status = $2, decided_by = $3, decision_note = $4, decided_at = now(), approved_cents = $5
WHERE id = $1 AND status = 'return_requested'
RETURNING {_COLUMNS}
"""  # noqa: S608
# What the returned lines are worth (migration 0100: one definition, reconcile uses it too).
SQL_SHARE = "SELECT return_share_cents($1, $2::jsonb)"
SQL_REFUNDED = f"""
UPDATE order_returns
SET status = 'refunded', refund_id = $2, refunded_at = now(), restocked = $3
WHERE id = $1 AND status = 'return_approved'
RETURNING {_COLUMNS}
"""  # noqa: S608
SQL_MERCHANT_RETURNS = f"""
SELECT {_COLUMNS}, count(*) OVER () AS total FROM order_returns r
WHERE ($2::text IS NULL OR r.status = $2)
  AND ($1::bigint IS NULL OR EXISTS (
      SELECT 1 FROM merchant_orders mo WHERE mo.order_id = r.order_id AND mo.merchant_id = $1))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $3 OFFSET $4
"""  # noqa: S608


def new_return_id() -> str:
    return "RET" + secrets.token_hex(10).upper()


async def _lines_coming_back(
    conn: Conn, order_id: str, wanted: Sequence[dict[str, int]] | None
) -> list[dict[str, int]]:
    """The lines a return sends back: ``wanted`` checked against what the order holds and
    what other returns already claim; all that is left when ``wanted`` is None."""
    ordered = {r["sku_id"]: r["quantity"] for r in await conn.fetch(SQL_ORDER_LINES, order_id)}
    claimed = {r["sku_id"]: r["quantity"] for r in await conn.fetch(SQL_RETURNED_UNITS, order_id)}
    left = {sku: qty - claimed.get(sku, 0) for sku, qty in ordered.items()}
    if wanted is None:
        lines = [{"sku_id": s, "quantity": q} for s, q in left.items() if q > 0]
        if not lines:
            raise ValidationFailed(fields={"items": "every unit of this order is already returned"})
        return lines
    errors: dict[str, str] = {}
    merged: dict[int, int] = {}
    for i, item in enumerate(wanted):
        sku, qty = item["sku_id"], item["quantity"]
        merged[sku] = merged.get(sku, 0) + qty
        if sku not in ordered:
            errors[f"items[{i}].sku_id"] = "not a line of this order"
        elif merged[sku] > left[sku]:
            errors[f"items[{i}].quantity"] = f"at most {left[sku]} unit(s) left to return"
    if errors:
        raise ValidationFailed(fields=errors)
    return [{"sku_id": s, "quantity": q} for s, q in sorted(merged.items())]


async def request_return(
    pool: asyncpg.Pool,
    order_id: str,
    actor: Actor,
    *,
    kind: str,
    reason: str,
    amount: int | None,
    items: Sequence[dict[str, int]] | None,
) -> dict[str, Any]:
    """The buyer asks for a return (goods back) or a refund on a shipped, delivered or
    completed order. ``amount`` defaults, for a return, to what its lines are worth (their
    units at their price, less the order's discount in proportion; shipping stays paid)
    and, for a money-only refund, to all that is not yet refunded."""
    async with pool.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, order_id)
        if order is None or order["user_id"] != actor.user_id:
            raise NotFound("order not found")
        if order["status"] not in RETURNABLE:
            raise invalid_transition(order["status"], "request a return for")
        if await conn.fetchval(SQL_OPEN_OF_ORDER, order_id, OPEN) is not None:
            raise ReturnInProgress(data={"order_id": order_id})
        left = order["pay_cents"] - order["refunded_cents"]
        if left <= 0:
            raise invalid_transition(order["status"], "request a return for")
        if amount is not None and amount > left:
            raise RefundExceedsPaid(data=payments.refundable(order))
        if kind == "return":
            lines = await _lines_coming_back(conn, order_id, items)
            default = min(left, await conn.fetchval(SQL_SHARE, order_id, lines))
        elif items:
            raise ValidationFailed(fields={"items": "only a return (kind: return) sends items"})
        else:
            lines, default = [], left
        if amount is None and default <= 0:
            raise ValidationFailed(fields={"amount": "the lines coming back are worth nothing"})
        rid = new_return_id()
        row = await conn.fetchrow(
            SQL_INSERT, rid, order_id, actor.user_id, kind, reason, amount or default, lines
        )
        assert row is not None
        await write_log(conn, order_id, actor, order["status"], OPEN, f"{rid} {kind}: {reason}")
    return return_view(row)


async def _lock(conn: Conn, return_id: str, actor: Actor) -> tuple[asyncpg.Record, asyncpg.Record]:
    found = await conn.fetchrow(SQL_RETURN, return_id)
    if found is None:
        raise NotFound("return not found")
    order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, found["order_id"])
    assert order is not None  # orders are never deleted
    try:
        await require_merchant(conn, order["id"], actor)
    except NotFound:
        raise NotFound("return not found") from None
    ret = await conn.fetchrow(SQL_RETURN_FOR_UPDATE, return_id)
    assert ret is not None
    return order, ret


async def _restock(conn: Conn, order: asyncpg.Record, ret: asyncpg.Record) -> None:
    regular = order["kind"] == "regular"
    for line in sorted(ret["items"], key=lambda i: i["sku_id"]):  # locks in key order
        await inventory.put_back(
            conn,
            line["sku_id"],
            order["id"],
            line["quantity"],
            regular=regular,
            reason=f"return:{ret['id']}",
        )


async def approve_return(
    pool: asyncpg.Pool,
    return_id: str,
    actor: Actor,
    *,
    note: str | None,
    refund_amount: int | None = None,
) -> dict[str, Any]:
    """Approve: the refund runs through the provider and, for a return, the units go back
    on the shelf — once. The refund is what the request asked, but for a return never more
    than its lines are worth — unless the approver sends ``refund_amount`` (any amount up
    to what is left paid), which is kept as the return's ``approved_amount``. A repeated
    or concurrent approval answers with the return as it is (``changed: false``);
    approving a rejected return is a 409."""
    async with pool.acquire() as conn, conn.transaction():
        order, ret = await _lock(conn, return_id, actor)
        if ret["status"] in ("return_approved", "refunded"):
            return {**return_view(ret), "changed": False}
        if ret["status"] != OPEN:
            raise invalid_transition(ret["status"], "approve")
        left = order["pay_cents"] - order["refunded_cents"]
        if refund_amount is not None:
            if refund_amount > left:
                raise RefundExceedsPaid(data=payments.refundable(order))
            amount = refund_amount
        elif ret["kind"] == "return":
            share = await conn.fetchval(SQL_SHARE, order["id"], ret["items"])
            amount = min(ret["amount_cents"], share, left)
        else:
            amount = min(ret["amount_cents"], left)
        decided = await conn.fetchrow(
            SQL_DECIDE, return_id, "return_approved", actor.user_id, note, refund_amount
        )
        assert decided is not None  # the row is locked and was open
        await write_log(
            conn,
            order["id"],
            actor,
            order["status"],
            "return_approved",
            f"{return_id} {note or ''}",
        )
        money = await payments.refund_locked(
            conn, order, actor, amount, f"return {return_id}: {ret['reason']}"
        )
        restock = ret["kind"] == "return"
        if restock:
            await _restock(conn, order, ret)
        done = await conn.fetchrow(SQL_REFUNDED, return_id, money["refund_id"], restock)
        assert done is not None
        if money["order_status"] != "refunded":  # a full refund logged the order's own move
            await write_log(
                conn,
                order["id"],
                actor,
                order["status"],
                "refunded",
                f"{return_id}: {money['refund_id']} {amount}",
            )
    return {
        **return_view(done),
        "changed": True,
        "refund": money,
    }


async def reject_return(
    pool: asyncpg.Pool, return_id: str, actor: Actor, *, note: str
) -> dict[str, Any]:
    """Reject with a note; repeating it changes nothing, rejecting an approved one is a 409."""
    async with pool.acquire() as conn, conn.transaction():
        order, ret = await _lock(conn, return_id, actor)
        if ret["status"] == "return_rejected":
            return {**return_view(ret), "changed": False}
        if ret["status"] != OPEN:
            raise invalid_transition(ret["status"], "reject")
        decided = await conn.fetchrow(
            SQL_DECIDE, return_id, "return_rejected", actor.user_id, note, None
        )
        assert decided is not None
        await write_log(
            conn, order["id"], actor, order["status"], "return_rejected", f"{return_id} {note}"
        )
    return {**return_view(decided), "changed": True}


async def list_returns(
    pool: asyncpg.Pool, actor: Actor, *, status: str | None, page: int, limit: int
) -> dict[str, Any]:
    """The returns of the merchant's orders (every return for an admin), newest first."""
    merchant = None if actor.role == "admin" else actor.user_id
    rows = await pool.fetch(SQL_MERCHANT_RETURNS, merchant, status, limit, offset(page, limit))
    total = rows[0]["total"] if rows else 0
    return page_of("returns", [return_view(r) for r in rows], total=total, page=page, limit=limit)
