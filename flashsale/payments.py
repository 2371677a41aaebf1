"""Payments (seed 000 §5): pay orders, the signed provider notification, refunds.

Which provider takes payments is a setting (``FLASHSALE_PAYMENT_PROVIDER``). With
``none`` (the default) no payment can be started (503 PAYMENT_PROVIDER_UNAVAILABLE),
but a signed notification is still verified and applied. ``sandbox`` stands in for
Alipay/WeChat in the demo and the tests: approving or failing a payment builds the
same HMAC-SHA256-signed notification a real provider would send and runs it through
:func:`process_notification`, the function behind ``POST /payment/notify``. A
notification is accepted once per (payment, status); a replay returns success and
changes nothing; a bad signature, amount or order is rejected.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import orjson

from flashsale import addresses, orders, presale
from flashsale.errors import (
    AddressRequired,
    AmountMismatch,
    AppError,
    BadSignature,
    FullRefundRequired,
    NotFound,
    OrderMismatch,
    OrderNotPayable,
    PaymentProviderUnavailable,
    RefundExceedsPaid,
    ReturnRequired,
    UnknownPayment,
)
from flashsale.orders import Actor
from flashsale.settings import Settings
from flashsale.stores.db import Conn
from flashsale.stores.metrics import get_metrics

log = logging.getLogger(__name__)

SANDBOX: Final = orders.SANDBOX_PROVIDER
PROVIDER: Final = Actor(None, "provider")
METHODS: Final = (
    {"method": "alipay", "name": "Alipay"},
    {"method": "wechat", "name": "WeChat Pay"},
    {"method": "unionpay", "name": "UnionPay"},
    {"method": "applepay", "name": "Apple Pay"},
)
METHOD_NAMES: Final = tuple(m["method"] for m in METHODS)
REFUND_ARRIVAL: Final = "1-3 business days"
SORT_KEYS: Final = orjson.OPT_SORT_KEYS

SQL_ORDER_FOR_UPDATE = orders.SQL_ORDER_FOR_UPDATE
SQL_PENDING_PAY = """
SELECT id, amount_cents, method, expires_at FROM pay_orders
WHERE order_id = $1 AND status = 'pending'
"""
SQL_UPDATE_PAY_METHOD = """
UPDATE pay_orders SET method = $2, return_url = coalesce($3, return_url), updated_at = now()
WHERE id = $1
"""
SQL_INSERT_PAY = """
INSERT INTO pay_orders (id, order_id, user_id, amount_cents, method, return_url, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
SQL_PENDING_PRESALE_PAY = """
SELECT id, amount_cents, method, expires_at FROM pay_orders
WHERE presale_order_id = $1 AND status = 'pending'
"""
SQL_INSERT_PRESALE_PAY = """
INSERT INTO pay_orders (id, presale_order_id, user_id, amount_cents, method, return_url,
                        expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
SQL_PAY_FOR_UPDATE = """
SELECT id, coalesce(order_id, presale_order_id) AS order_id,
       presale_order_id IS NOT NULL AS presale, user_id, amount_cents, method, status,
       transaction_id, paid_at, expires_at, created_at
FROM pay_orders WHERE id = $1 FOR UPDATE
"""
SQL_PAY = """
SELECT id, coalesce(order_id, presale_order_id) AS order_id,
       presale_order_id IS NOT NULL AS presale, user_id, amount_cents, method, status,
       transaction_id, paid_at, expires_at, created_at
FROM pay_orders WHERE id = $1
"""
SQL_RECORD_NOTIFICATION = """
INSERT INTO payment_notifications (payment_id, order_id, dedupe_key, accepted, outcome, body)
VALUES ($1, $2, $3, true, $4, $5)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id
"""
SQL_RECORD_REJECTION = """
INSERT INTO payment_notifications (payment_id, order_id, dedupe_key, accepted, outcome, body)
VALUES ($1, $2, NULL, false, $3, $4)
"""
SQL_PAY_SUCCESS = """
UPDATE pay_orders SET status = 'success', transaction_id = $2, paid_at = now(),
    updated_at = now()
WHERE id = $1 AND status <> 'success'
"""
# A verified payment its order cannot take: the provider refunds it at once (the sandbox
# completes the refund), the pay order ends 'refunded'.
SQL_PAY_REFUNDED = """
UPDATE pay_orders SET status = 'refunded', transaction_id = $2, paid_at = now(),
    updated_at = now()
WHERE id = $1 AND status NOT IN ('success', 'refunded')
"""
SQL_INSERT_PAY_REFUND = """
INSERT INTO refunds (id, order_id, presale_order_id, pay_order_id, amount_cents, reason,
                     status, requested_by, completed_at)
VALUES ($1, $2, $3, $4, $5, $6, 'completed', $7, now())
"""
# A cancelled order's verified payments and what of each was not given back (a late payment
# is refunded at once; this finds what was kept anyway): an admin's refund gives it back.
SQL_KEPT_PAYMENTS = """
SELECT p.id, (p.amount_cents - coalesce(
           (SELECT sum(f.amount_cents) FROM refunds f WHERE f.pay_order_id = p.id), 0))::bigint
       AS kept
FROM pay_orders p
WHERE p.order_id = $1 AND p.status IN ('success', 'refunded')
ORDER BY p.id
"""
SQL_PAY_MARK_REFUNDED = """
UPDATE pay_orders SET status = 'refunded', updated_at = now() WHERE id = $1 AND status = 'success'
"""
# What went back of the order's price: the late payment was the only money it took (a
# cancelled or expired order), unless that would count more than the price (an order
# paid by another payment, or paid twice late) — those refunds stay on their pay orders.
SQL_ORDER_LATE_REFUNDED = """
UPDATE orders SET refunded_cents = refunded_cents + $2, updated_at = now()
WHERE id = $1 AND refunded_cents + $2 <= pay_cents
"""
SQL_PRESALE_LATE_REFUNDED = """
UPDATE presale_orders SET refunded_cents = refunded_cents + $2, updated_at = now()
WHERE id = $1 AND refunded_cents + $2 <= total_cents
"""
SQL_PAY_FAILED = """
UPDATE pay_orders SET status = 'failed', transaction_id = $2, updated_at = now()
WHERE id = $1 AND status = 'pending'
"""
SQL_SUCCESS_PAY = "SELECT id FROM pay_orders WHERE order_id = $1 AND status = 'success'"
SQL_SET_ADDRESS = """
UPDATE orders SET shipping_address = $2, updated_at = now() WHERE id = $1
"""
SQL_INSERT_REFUND = """
INSERT INTO refunds (id, order_id, pay_order_id, amount_cents, reason, status, requested_by,
                     completed_at)
VALUES ($1, $2, $3, $4, $5, 'completed', $6, now())
RETURNING created_at
"""
SQL_ADD_REFUNDED = """
UPDATE orders SET refunded_cents = refunded_cents + $3, updated_at = now(), version = version + 1
WHERE id = $1 AND version = $2
RETURNING refunded_cents, version
"""
SQL_TO_REFUNDED = """
UPDATE orders SET status = 'refunded', updated_at = now(), version = version + 1
WHERE id = $1 AND version = $2
RETURNING version
"""


# States in which an order took no payment: a late one refunded is then what went back of
# its price (SQL_ORDER_LATE_REFUNDED); on an order another payment paid it is not.
UNPAID_ENDS: Final = ("cancelled", "expired", "oversold")
# A shopper alone may refund only what has not left the warehouse.
SHOPPER_REFUNDABLE: Final = ("paid",)


def provider_available(settings: Settings) -> bool:
    """Whether a provider can take a payment (the sandbox is the only one built in)."""
    return settings.payment_provider == SANDBOX


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The signed form of a notification: every field sent except ``sign`` (unknown and
    null ones too) as compact JSON with sorted keys, UTF-8 — what Python's
    ``json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
    gives. JSON quoting keeps a value from passing for a field boundary."""
    return orjson.dumps({k: v for k, v in fields.items() if k != "sign"}, option=SORT_KEYS)


def sign(key: bytes, fields: Mapping[str, Any]) -> str:
    """Hex HMAC-SHA256 of :func:`canonical` ``(fields)``."""
    return hmac.new(key, canonical(fields), hashlib.sha256).hexdigest()


def new_refund_id() -> str:
    return "REF" + secrets.token_hex(10).upper()


def _expires_in(expires_at: datetime) -> int:
    return max(0, int((expires_at - datetime.now(UTC)).total_seconds()))


@dataclass(frozen=True, slots=True)
class _Payable:
    """What a payment is taken for: a regular/flash order or a presale order."""

    amount_cents: int
    expires_at: datetime
    pending_sql: str
    insert_sql: str


async def _lock_payable(
    conn: Conn, order_id: str, user_id: int, address_id: int | None
) -> _Payable:
    """Lock the caller's unpaid order (``orders`` first, else ``presale_orders``: both take
    their ids from the one order-id generator) or refuse: 404 if it is not theirs, 409 if it
    cannot be paid. An order ships somewhere: ``address_id`` (an entry of the caller's
    book) replaces its address; one with none takes the caller's default, and without a
    default it is refused (409 ADDRESS_REQUIRED)."""
    order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, order_id)
    if order is not None:
        if order["user_id"] != user_id:
            raise NotFound("order not found")
        if order["status"] != "pending_payment":
            raise orders.invalid_transition(order["status"], "pay")
        if address_id is not None or order["shipping_address"] is None:
            address = await addresses.resolve(conn, user_id, address_id)
            if address is None:
                raise AddressRequired(data={"order_id": order_id})
            await conn.execute(SQL_SET_ADDRESS, order_id, address)
        return _Payable(
            order["pay_cents"], order["payment_deadline"], SQL_PENDING_PAY, SQL_INSERT_PAY
        )
    pre = await presale.lock_for_payment(conn, order_id)
    if pre is None or pre["user_id"] != user_id:
        raise NotFound("order not found")
    presale.check_payable(pre)
    return _Payable(
        pre["total_cents"], pre["expires_at"], SQL_PENDING_PRESALE_PAY, SQL_INSERT_PRESALE_PAY
    )


async def create_payment(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    order_id: str,
    user_id: int,
    method: str,
    return_url: str | None,
    amount: int | None,
    address_id: int | None = None,
) -> dict[str, Any]:
    """The pending pay order of an unpaid order — regular, flash or presale — (created or
    switched to ``method``)."""
    if not provider_available(settings):
        raise PaymentProviderUnavailable
    async with pool.acquire() as conn, conn.transaction():
        due = await _lock_payable(conn, order_id, user_id, address_id)
        if amount is not None and amount != due.amount_cents:
            raise AmountMismatch(
                "amount does not match the order",
                data={"expected": due.amount_cents, "got": amount},
            )
        pay = await conn.fetchrow(due.pending_sql, order_id)
        if pay is not None:
            await conn.execute(SQL_UPDATE_PAY_METHOD, pay["id"], method, return_url)
            pid, expires_at = pay["id"], pay["expires_at"]
        else:
            pid, expires_at = orders.new_payment_id(), due.expires_at
            await conn.execute(
                due.insert_sql,
                pid,
                order_id,
                user_id,
                due.amount_cents,
                method,
                return_url,
                expires_at,
            )
    return {
        "payment_id": pid,
        "order_id": order_id,
        "amount": due.amount_cents,
        "payment_method": method,
        "payment_url": None,  # an HTTP path: the HTTP layer fills it in
        "qr_code": None,
        "expires_in": _expires_in(expires_at),
        "expires_at": expires_at,
    }


async def get_payment(
    pool: asyncpg.Pool, settings: Settings, payment_id: str, user_id: int, role: str
) -> dict[str, Any]:
    row = await pool.fetchrow(SQL_PAY, payment_id)
    if row is None or (role != "admin" and row["user_id"] != user_id):
        raise NotFound("payment not found")
    provider = settings.payment_provider
    return {
        "payment_id": row["id"],
        "order_id": row["order_id"],
        "amount": row["amount_cents"],
        "payment_method": row["method"],
        "status": row["status"],
        "provider": provider,
        "transaction_id": row["transaction_id"],
        "paid_at": row["paid_at"],
        "expires_at": row["expires_at"],
        "created_at": row["created_at"],
    }


def _log_rejection(body: Mapping[str, Any], exc: AppError) -> None:
    # repr(): the values come from an unauthenticated caller; a newline must not forge a line.
    log.warning(
        "payment notification rejected: %s payment_id=%r order_id=%r",
        exc.code,
        body.get("payment_id"),
        body.get("order_id"),
    )


def signature_ok(key: bytes, body: Mapping[str, Any]) -> bool:
    """Whether ``body["sign"]`` is the HMAC of the canonical form of all its other fields."""
    given = body.get("sign")
    return isinstance(given, str) and hmac.compare_digest(given, sign(key, body))


async def process_notification(
    pool: asyncpg.Pool, settings: Settings, body: dict[str, Any]
) -> dict[str, Any]:
    """Verify and apply one provider notification (seed §5.2); idempotent.

    Nothing is written before the signature checks out: anyone can call the endpoint.
    A signed notification that cannot be applied is recorded as rejected."""
    if not signature_ok(settings.payment_hmac_key, body):
        exc = BadSignature()
        _log_rejection(body, exc)
        raise exc
    try:
        return await _apply(pool, body)
    except AppError as exc:
        _log_rejection(body, exc)
        await pool.execute(
            SQL_RECORD_REJECTION,
            str(body.get("payment_id") or ""),
            str(body.get("order_id") or ""),
            exc.code,
            dict(body),
        )
        raise


async def _apply(pool: asyncpg.Pool, body: dict[str, Any]) -> dict[str, Any]:
    payment_id, status = body["payment_id"], body["status"]
    refunded: dict[str, Any] | None = None
    async with pool.acquire() as conn, conn.transaction():
        # One lock order everywhere (cancel, timeout close, refund, payment creation): the
        # order row first, then its pay orders. The unlocked read only finds the order.
        found = await conn.fetchrow(SQL_PAY, payment_id)
        if found is None:
            raise UnknownPayment
        if found["order_id"] != body["order_id"]:
            raise OrderMismatch
        if found["presale"]:
            order = await presale.lock_for_payment(conn, found["order_id"])
        else:
            order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, found["order_id"])
        pay = await conn.fetchrow(SQL_PAY_FOR_UPDATE, payment_id)
        assert order is not None and pay is not None  # orders and pay orders are never deleted
        if pay["amount_cents"] != body["amount"]:
            raise AmountMismatch(
                "notification amount does not match the payment",
                data={"expected": pay["amount_cents"], "got": body["amount"]},
            )
        recorded = await conn.fetchval(
            SQL_RECORD_NOTIFICATION,
            payment_id,
            pay["order_id"],
            f"{payment_id}:{status}",
            "applied",
            body,
        )
        if recorded is None:
            return {"result": "success", "duplicate": True, "payment_id": payment_id}
        if status == "failed":
            await conn.execute(SQL_PAY_FAILED, payment_id, body.get("transaction_id"))
            return {
                "result": "success",
                "duplicate": False,
                "payment_id": payment_id,
                "payment_status": "failed",
            }
        if found["presale"]:
            # Status- and expiry-guarded: a cancelled, expired or already paid presale
            # order is not paid (again).
            if not await presale.mark_paid(conn, order["id"]):
                state = "expired" if order["status"] == "pending" else order["status"]
                refunded = await _give_back_late(conn, pay, state, body)
            else:
                version = order["version"] + 1  # the row is locked: nobody else moved it
        elif order["status"] != "pending_payment":
            refunded = await _give_back_late(conn, pay, order["status"], body)
        else:
            version = await orders.mark_paid(
                conn,
                order,
                PROVIDER,
                f"{pay['method']} {body.get('transaction_id')}",
            )
        if refunded is None:
            await conn.execute(SQL_PAY_SUCCESS, payment_id, body.get("transaction_id"))
    if refunded is not None:
        get_metrics().payments_refunded.labels(refunded["order_status"]).inc()
        return {"result": "success", "duplicate": False, "payment_id": payment_id, **refunded}
    return {
        "result": "success",
        "duplicate": False,
        "payment_id": payment_id,
        "payment_status": "success",
        "order_status": "paid",
        "version": version,
    }


async def _give_back_late(
    conn: Conn, pay: asyncpg.Record, state: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """The money of a verified payment whose order cannot take it — cancelled, expired or
    paid by another payment (a cancel racing the approval ends here) — goes back through
    the provider at once, in the transaction that records the notification, so a replay
    refunds nothing more. The pay order ends ``refunded``; the order's log says so (a
    presale order has no log: the service log does)."""
    rid = new_refund_id()
    regular = not pay["presale"]
    reason = f"payment arrived after the order was {state}"
    await conn.execute(SQL_PAY_REFUNDED, pay["id"], body.get("transaction_id"))
    await conn.execute(
        SQL_INSERT_PAY_REFUND,
        rid,
        pay["order_id"] if regular else None,
        None if regular else pay["order_id"],
        pay["id"],
        pay["amount_cents"],
        reason,
        None,  # no user asked: the provider gives it back
    )
    if state in UNPAID_ENDS:
        await conn.execute(
            SQL_ORDER_LATE_REFUNDED if regular else SQL_PRESALE_LATE_REFUNDED,
            pay["order_id"],
            pay["amount_cents"],
        )
    if regular:
        await orders.write_log(
            conn, pay["order_id"], PROVIDER, state, "payment_refunded", f"{pay['id']} {rid}"
        )
    log.warning(
        "payment %s refunded at once (%s): order %s is %s",
        pay["id"],
        rid,
        pay["order_id"],
        state,
    )
    return {
        "payment_status": "refunded",
        "order_status": state,
        "refund_id": rid,
        "refund_amount": pay["amount_cents"],
    }


async def sandbox_complete(
    pool: asyncpg.Pool,
    settings: Settings,
    payment_id: str,
    user_id: int,
    role: str,
    *,
    approve: bool,
) -> dict[str, Any]:
    """What the sandbox provider does when the payer approves or fails: sign and notify."""
    if settings.payment_provider != SANDBOX:
        raise NotFound("payment not found")
    pay = await get_payment(pool, settings, payment_id, user_id, role)
    fields: dict[str, Any] = {
        "payment_id": pay["payment_id"],
        "order_id": pay["order_id"],
        "status": "success" if approve else "failed",
        "amount": pay["amount"],
        "transaction_id": "SBX" + secrets.token_hex(10).upper(),
        "paid_at": datetime.now(UTC).isoformat(),
    }
    fields["sign"] = sign(settings.payment_hmac_key, fields)
    result = await process_notification(pool, settings, fields)
    if result.get("payment_status") == "refunded" and not result["duplicate"]:
        # The provider took the money and gave it back: the payer hears the order was not
        # paid, and where the money went.
        raise OrderNotPayable(
            f"order is {result['order_status']}; the payment was refunded",
            data={k: result[k] for k in ("order_status", "refund_id", "refund_amount")},
        )
    return {"notification": fields, "result": result}


async def refund(
    pool: asyncpg.Pool, *, order_id: str, actor: Actor, amount: int | None, reason: str
) -> dict[str, Any]:
    """Money back for an order, all of what is left (``amount``, when sent, must be that).

    Before the order ships (``paid``) a refund cancels it: everything paid goes back and so
    do its units and coupon — a partial refund there would leave a shippable order paid
    below its price. After shipping the shopper asks for a return, which the merchant or
    an admin approves (:mod:`flashsale.orders.returns`: a partial refund is a return's);
    an admin may still refund directly what is left, and the order ends ``refunded``."""
    async with pool.acquire() as conn, conn.transaction():
        order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE, order_id)
        if order is None or (actor.role != "admin" and order["user_id"] != actor.user_id):
            raise NotFound("order not found")
        if order["status"] in orders.REFUNDABLE and (
            actor.role != "admin" and order["status"] not in SHOPPER_REFUNDABLE
        ):
            raise ReturnRequired(data={"status": order["status"]})
        left = order["pay_cents"] - order["refunded_cents"]
        if amount is not None and amount != left and order["status"] in orders.REFUNDABLE:
            exc = RefundExceedsPaid if amount > left else FullRefundRequired
            raise exc(data=refundable(order))
        if order["status"] == "cancelled" and actor.role == "admin":
            return await _refund_kept(conn, order, actor, amount, reason)
        if order["status"] != "paid":
            return await refund_locked(conn, order, actor, left, reason)
        money = await _give_back(conn, order, actor, left, reason)
        version = await orders.cancel_paid(
            conn, order, actor, f"refunded before shipping: {reason}", version=money["version"]
        )
    return {**money, "order_status": "cancelled", "version": version}


async def _refund_kept(
    conn: Conn, order: asyncpg.Record, actor: Actor, amount: int | None, reason: str
) -> dict[str, Any]:
    """An admin gives back what verified payments of a cancelled order kept (what
    ``flashsale reconcile`` reports as ``cancelled_payment_kept``): every such payment in
    full; ``amount``, when sent, must be their total."""
    kept = [(r["id"], r["kept"]) for r in await conn.fetch(SQL_KEPT_PAYMENTS, order["id"])]
    kept = [(pid, cents) for pid, cents in kept if cents > 0]
    total = sum(cents for _, cents in kept)
    if not kept:
        raise orders.invalid_transition(order["status"], "refund")
    if amount is not None and amount != total:
        exc = RefundExceedsPaid if amount > total else FullRefundRequired
        raise exc(data={"paid": total, "refunded": 0, "refundable": total})
    refund_ids = []
    for pid, cents in kept:
        rid = new_refund_id()
        await conn.execute(
            SQL_INSERT_PAY_REFUND, rid, order["id"], None, pid, cents, reason, actor.user_id
        )
        await conn.execute(SQL_PAY_MARK_REFUNDED, pid)
        await conn.execute(SQL_ORDER_LATE_REFUNDED, order["id"], cents)
        await orders.write_log(
            conn, order["id"], actor, "cancelled", "payment_refunded", f"{pid} {rid}: {reason}"
        )
        refund_ids.append(rid)
    return {
        "refund_id": refund_ids[0],
        "refund_ids": refund_ids,
        "order_id": order["id"],
        "refund_amount": total,
        "status": "completed",
        "estimated_arrival": REFUND_ARRIVAL,
        "order_status": "cancelled",
        "version": order["version"],
    }


def refundable(order: asyncpg.Record) -> dict[str, int]:
    """What an order paid, what went back and what is left (a refusal's data)."""
    return {
        "paid": order["pay_cents"],
        "refunded": order["refunded_cents"],
        "refundable": order["pay_cents"] - order["refunded_cents"],
    }


async def _give_back(
    conn: Conn, order: asyncpg.Record, actor: Actor, amount: int, reason: str
) -> dict[str, Any]:
    """Refund ``amount`` of the verified payment of ``order`` (its row locked) through the
    provider (the sandbox completes it at once): a ``refunds`` row and ``refunded_cents``.
    The refunds of an order never exceed what it paid."""
    order_id = order["id"]
    if order["status"] not in orders.REFUNDABLE:
        raise orders.invalid_transition(order["status"], "refund")
    pay_id = await conn.fetchval(SQL_SUCCESS_PAY, order_id)
    left = order["pay_cents"] - order["refunded_cents"]
    if pay_id is None or left <= 0:
        raise orders.invalid_transition(order["status"], "refund")
    if amount > left:
        raise RefundExceedsPaid("refund exceeds what was paid", data=refundable(order))
    rid = new_refund_id()
    await conn.execute(SQL_INSERT_REFUND, rid, order_id, pay_id, amount, reason, actor.user_id)
    row = await conn.fetchrow(SQL_ADD_REFUNDED, order_id, order["version"], amount)
    assert row is not None  # the order row is locked: its version cannot have moved
    return {
        "refund_id": rid,
        "order_id": order_id,
        "refund_amount": amount,
        "status": "completed",
        "estimated_arrival": REFUND_ARRIVAL,
        "refunded_total": row["refunded_cents"],
        "order_status": order["status"],
        "version": row["version"],
    }


async def refund_locked(
    conn: Conn, order: asyncpg.Record, actor: Actor, amount: int, reason: str
) -> dict[str, Any]:
    """Refund ``amount`` of a shipped (or later) ``order``, its row locked by the caller's
    transaction, and move it to ``refunded`` once all it paid went back. Checks money, not
    who asks."""
    money = await _give_back(conn, order, actor, amount, reason)
    if money["refunded_total"] == order["pay_cents"]:
        version = await conn.fetchval(SQL_TO_REFUNDED, order["id"], money["version"])
        await orders.write_log(conn, order["id"], actor, order["status"], "refunded", reason)
        money = {**money, "order_status": "refunded", "version": version}
    return money
