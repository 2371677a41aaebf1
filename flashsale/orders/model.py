"""What every part of an order speaks: statuses, actors, the order row, its log, and the
two refusals of the state machine."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

import asyncpg

from flashsale.auth import Principal
from flashsale.errors import (
    InvalidTransition,
    NotFound,
    VersionConflict,
)
from flashsale.stores.db import Conn

SANDBOX_PROVIDER: Final = "sandbox"
STATUSES: Final = (
    "pending_payment",
    "paid",
    "shipped",
    "delivered",
    "completed",
    "cancelled",
    "refunded",
)
REFUNDABLE: Final = ("paid", "shipped", "delivered", "completed")
# Every status a row of orders can hold (its CHECK constraint; tests/test_backoffice.py
# compares): STATUSES and "oversold", which the flash consumer writes for a unit promised
# twice (consumers/order_events.py) and no client sets or filters by.
ALL_STATUSES: Final = (*STATUSES, "oversold")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who changes an order: a user, a merchant, an admin or the system (sweepers)."""

    user_id: int | None
    role: str

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        """The signed-in caller making the change."""
        return cls(principal.user_id, principal.role)


SYSTEM: Final = Actor(None, "system")

SQL_LOG = """
INSERT INTO order_logs (order_id, actor_id, actor_role, from_status, to_status, note)
VALUES ($1, $2, $3, $4, $5, $6)
"""
ORDER_COLUMNS = """
id, user_id, kind, status, total_cents, discount_cents, shipping_cents, pay_cents,
refunded_cents, payment_deadline, shipping_address, version, created_at, updated_at, paid_at,
cancelled_at, cancel_reason, coupon_code, shipping_company, tracking_number,
estimated_delivery, shipped_at, delivered_at, completed_at
"""
SQL_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"  # noqa: S608
SQL_ORDER_FOR_UPDATE = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"  # noqa: S608


def invalid_transition(status: str, action: str) -> InvalidTransition:
    return InvalidTransition(
        f"cannot {action} an order that is {status}",
        data={"status": status, "action": action},
    )


def version_conflict(order_id: str) -> VersionConflict:
    return VersionConflict(f"order {order_id} was changed by someone else; reload it and retry")


def new_payment_id() -> str:
    return "PAY" + secrets.token_hex(10).upper()


async def write_log(
    conn: Conn,
    order_id: str,
    actor: Actor,
    from_status: str | None,
    to_status: str,
    note: str | None = None,
) -> None:
    await conn.execute(SQL_LOG, order_id, actor.user_id, actor.role, from_status, to_status, note)


async def load_own(
    conn: Conn, order_id: str, actor: Actor, *, lock: bool = False
) -> asyncpg.Record:
    """The order if ``actor`` is its buyer or an admin; 404 otherwise (and when missing)."""
    order = await conn.fetchrow(SQL_ORDER_FOR_UPDATE if lock else SQL_ORDER, order_id)
    if order is None or (actor.role != "admin" and order["user_id"] != actor.user_id):
        raise NotFound("order not found")
    return order
