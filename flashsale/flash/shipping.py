"""What a new flash order needs to be shipped: its item snapshot and its address.

The join path carries neither (one Redis round trip, no database query); the consumer
calls :func:`prepare_new_orders` in the transaction that writes the orders, with one query
for the snapshots and one for the addresses per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from flashsale import addresses
from flashsale.db import Conn
from flashsale.orders.create import SQL_SKUS_FOR_ORDER, snapshot_id

SQL_SET_ITEM_SNAPSHOTS = """
UPDATE order_items oi SET snapshot_id = s.snapshot_id
FROM unnest($1::text[], $2::bigint[]) AS s(order_id, snapshot_id)
WHERE oi.order_id = s.order_id AND oi.snapshot_id IS NULL
"""


class NewFlashOrder(addresses.FlashOrderRef, Protocol):
    @property
    def sku_id(self) -> int: ...


async def prepare_new_orders(conn: Conn, orders: Sequence[NewFlashOrder]) -> None:
    """Snapshot the items of just-written flash orders (product name, image, SKU) and give
    each order its address (see :func:`flashsale.addresses.address_flash_orders`)."""
    if not orders:
        return
    skus = await conn.fetch(SQL_SKUS_FOR_ORDER, sorted({o.sku_id for o in orders}))
    snaps = {r["sku_id"]: await snapshot_id(conn, r) for r in skus}
    known = [o for o in orders if o.sku_id in snaps]
    await conn.execute(
        SQL_SET_ITEM_SNAPSHOTS, [o.order_id for o in known], [snaps[o.sku_id] for o in known]
    )
    await addresses.address_flash_orders(conn, orders)
