"""What a new flash order needs to be shipped: its item snapshot and its address.

The join path carries neither (one Redis round trip, no database query). The consumer
asks :func:`prepare` before it writes a batch — one query for the SKUs and one for the
addresses per batch — and writes both with the order and item rows themselves (an UPDATE
of the rows just written would cost about as much as writing them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flashsale import addresses
from flashsale.orders.create import SQL_SKUS_FOR_ORDER, snapshot_id
from flashsale.stores.db import Conn


class NewFlashOrder(addresses.FlashOrderRef, Protocol):
    @property
    def sku_id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Shipping:
    """Per order id, its address snapshot; per SKU, the id of its item snapshot."""

    address: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot: dict[int, int] = field(default_factory=dict)

    def addresses_of(self, orders: Sequence[NewFlashOrder]) -> list[dict[str, Any] | None]:
        return [self.address.get(o.order_id) for o in orders]

    def snapshots_of(self, orders: Sequence[NewFlashOrder]) -> list[int | None]:
        return [self.snapshot.get(o.sku_id) for o in orders]


async def prepare(conn: Conn, orders: Sequence[NewFlashOrder]) -> Shipping:
    """The item snapshots (product name, image, SKU; stored once per content) and the
    addresses (see :func:`flashsale.addresses.flash_order_addresses`) of these orders."""
    if not orders:
        return Shipping()
    skus = await conn.fetch(SQL_SKUS_FOR_ORDER, sorted({o.sku_id for o in orders}))
    return Shipping(
        address=await addresses.flash_order_addresses(conn, orders),
        snapshot={r["sku_id"]: await snapshot_id(conn, r) for r in skus},
    )
