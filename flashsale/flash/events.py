"""The order event a gateway produces for every accepted flash-sale reservation.

Key: the sale id (ASCII) so that one sale's events stay ordered on one partition.
Value: compact JSON (orjson). ``v`` is the schema version; consumers dead-letter
anything they cannot parse or that breaks a rule, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

SCHEMA_VERSION: Final = 1
MAX_REQUEST_ID: Final = 128  # the gateway keeps a client's X-Request-ID up to this length


class BadEvent(ValueError):
    """An event that cannot be parsed or violates a rule; goes to the dead-letter topic."""


@dataclass(frozen=True, slots=True)
class OrderEvent:
    order_id: str
    sale_id: int
    user_id: int
    sku_id: int
    product_id: int
    quantity: int
    price_cents: int
    payment_deadline_ms: int
    reserved_at_ms: int
    v: int = SCHEMA_VERSION
    # The join's request id, so one grep follows an order from its HTTP request to the
    # consumer's log line; empty for events rebuilt from the reservation log.
    request_id: str = ""

    @property
    def key(self) -> bytes:
        return str(self.sale_id).encode()

    def encode(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises (slotted) dataclasses natively


_INT_FIELDS: Final = (
    "sale_id",
    "user_id",
    "sku_id",
    "product_id",
    "quantity",
    "price_cents",
    "payment_deadline_ms",
    "reserved_at_ms",
)


def decode(raw: bytes | None) -> OrderEvent:
    """Parse and check one event; raise BadEvent with the reason."""
    if raw is None:
        raise BadEvent("empty message")
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"not JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise BadEvent("not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise BadEvent(f"unsupported schema version {data.get('v')!r}")
    order_id = data.get("order_id")
    if not isinstance(order_id, str) or not order_id.isdigit() or len(order_id) > 32:
        raise BadEvent("order_id missing or malformed")
    for name in _INT_FIELDS:
        value = data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadEvent(f"{name} missing or not a non-negative integer")
    if data["quantity"] < 1:
        raise BadEvent("quantity must be positive")
    rid = data.get("request_id")
    # A log field never costs an order: a malformed one is dropped, not dead-lettered.
    request_id = rid if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID else ""
    return OrderEvent(order_id=order_id, request_id=request_id, **{n: data[n] for n in _INT_FIELDS})


def pack_entry(e: OrderEvent) -> str:
    """The reservation-log form of an event (what lua/reserve.lua writes)."""
    return (
        f"{e.user_id}|{e.sku_id}|{e.product_id}|{e.quantity}|{e.price_cents}"
        f"|{e.payment_deadline_ms}|{e.reserved_at_ms}"
    )


def parse_entry(sale_id: int, order_id: str, entry: bytes) -> OrderEvent:
    """An event from its reservation-log form (see :func:`pack_entry`)."""
    user, sku, product, qty, price, deadline, reserved = entry.decode().split("|")
    return OrderEvent(
        order_id=order_id,
        sale_id=sale_id,
        user_id=int(user),
        sku_id=int(sku),
        product_id=int(product),
        quantity=int(qty),
        price_cents=int(price),
        payment_deadline_ms=int(deadline),
        reserved_at_ms=int(reserved),
    )
