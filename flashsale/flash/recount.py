"""A fenced sale's counters, recomputed from what every source says (no I/O here).

The recovery sweeper (``consumers/recovery.py``) reads the sources; ``recount`` sums them.
An order seen in several places is counted once: an order in the record (PostgreSQL) is
counted from there, a reservation in the log or the claims replaces the broker's copy of
its event, and one voided before any consumer claimed it is never counted. ``Snapshot``
is the result, and ``payload`` what ``lua/sale_rearm.lua`` writes into each bucket.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from flashsale.flash import buckets as bucketing
from flashsale.flash.events import OrderEvent, pack_entry

NOT_HOLDING: Final = ("cancelled", "oversold")  # order statuses that hold no sale units


class Row(Protocol):
    """A row by column name (an asyncpg record, or a dict in a test)."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass
class Snapshot:
    """One sale's recomputed state, ready for ``lua/sale_rearm.lua``."""

    sale_id: int
    allotment: int
    remaining: int
    moved_out: int
    closed: bool
    live: int
    inflight: dict[str, OrderEvent]
    users: dict[int, int]
    first: dict[int, str]
    returned: dict[str, int]  # cancelled order id -> its shopper
    deficit: int = 0  # units promised beyond the allotment (each such order ends "oversold")
    buckets: int = 1

    def payload(self, bucket: int = 0) -> bytes:
        """What ``lua/sale_rearm.lua`` writes into ``bucket``: its shoppers' counts and
        reservations, its share of the allotment and of what remains (moved_out all in
        bucket 0); for a sale of one bucket, the whole sale."""
        n = self.buckets

        def mine(user_id: int) -> bool:
            return bucketing.home(user_id, n) == bucket

        return orjson.dumps(
            {
                "allotment": bucketing.share(self.allotment, bucket, n),
                "remaining": bucketing.share(self.remaining, bucket, n),
                "moved_out": self.moved_out if bucket == 0 else 0,
                "closed": 1 if self.closed else 0,
                "users": {str(u): k for u, k in self.users.items() if mine(u)},
                "first": {str(u): o for u, o in self.first.items() if mine(u)},
                "inflight": {
                    oid: pack_entry(e) for oid, e in self.inflight.items() if mine(e.user_id)
                },
                "returned": [oid for oid, u in self.returned.items() if mine(u)],
            }
        )


def recount(
    sale: Row,
    *,
    broker_events: Iterable[OrderEvent],
    voided: Iterable[str],
    reserved: Iterable[OrderEvent],
    orders: Sequence[Row],
    now_s: float,
) -> Snapshot:
    """One sale's counters from its sources, in the reverse of the order an event moves
    through them: the broker's events past the committed offsets, the order ids Redis
    voided, the reservations in its log and claims, then the record's orders (``id``,
    ``user_id``, ``status``, ``units``). ``sale`` is the ``flash_sales`` row."""
    sid = sale["id"]
    inflight: dict[str, OrderEvent] = {e.order_id: e for e in broker_events if e.sale_id == sid}
    for oid in voided:  # released before any consumer claimed it: never to be written
        inflight.pop(oid, None)
    for e in reserved:
        inflight[e.order_id] = e
    users: dict[int, int] = defaultdict(int)
    first: dict[int, str] = {}
    live = 0
    returned: dict[str, int] = {}
    for r in orders:
        inflight.pop(r["id"], None)  # in the record: counted from there, once
        if r["status"] == "cancelled":
            returned[r["id"]] = r["user_id"]
        if r["status"] in NOT_HOLDING:
            continue
        live += r["units"]
        users[r["user_id"]] += r["units"]
        first[r["user_id"]] = min(first.get(r["user_id"], r["id"]), r["id"])
    flying = 0
    for oid, e in inflight.items():
        flying += e.quantity
        users[e.user_id] += e.quantity
        first[e.user_id] = min(first.get(e.user_id, oid), oid)
    quantity = int(sale["quantity"])
    closed = sale["closed_at"] is not None or sale["end_at"].timestamp() <= now_s
    unsold = quantity - live - flying
    returned_units = int(sale["returned_quantity"])
    if closed:
        remaining, moved_out = 0, max(unsold, returned_units)
    else:
        remaining, moved_out = max(0, unsold - returned_units), returned_units
    return Snapshot(
        sale_id=sid,
        allotment=quantity,
        remaining=remaining,
        moved_out=moved_out,
        closed=closed,
        live=live,
        inflight=inflight,
        users=dict(users),
        first=first,
        returned=returned,
        deficit=max(0, -unsold),
        buckets=int(sale["buckets"]),
    )
