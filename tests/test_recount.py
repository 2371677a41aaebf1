"""A fenced sale's recount from its sources: each order counted once, wherever it is seen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flashsale.flash.events import OrderEvent
from flashsale.flash.recount import recount

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _event(order_id: str, user_id: int, quantity: int, sale_id: int = 7) -> OrderEvent:
    return OrderEvent(order_id, sale_id, user_id, 1, 1, quantity, 100, 0, 0)


def _sale(**over: Any) -> dict[str, Any]:
    sale = {
        "id": 7,
        "quantity": 10,
        "returned_quantity": 1,
        "closed_at": None,
        "end_at": NOW + timedelta(hours=1),
        "buckets": 1,
    }
    return sale | over


def test_each_order_is_counted_once_from_the_furthest_source() -> None:
    snap = recount(
        _sale(),
        broker_events=[
            _event("A", 1, 2),  # also in the record: counted from there
            _event("B", 2, 1),  # voided before any consumer claimed it
            _event("C", 3, 1),  # also in the log
            _event("X", 9, 5, sale_id=8),  # another sale's
        ],
        voided=["B"],
        reserved=[_event("C", 3, 1), _event("D", 3, 1)],
        orders=[
            {"id": "A", "user_id": 1, "status": "paid", "units": 2},
            {"id": "E", "user_id": 4, "status": "cancelled", "units": 1},
        ],
        now_s=NOW.timestamp(),
    )
    assert set(snap.inflight) == {"C", "D"}
    assert (snap.live, snap.users, snap.first) == (2, {1: 2, 3: 2}, {1: "A", 3: "C"})
    assert snap.returned == {"E": 4}
    # 10 - 2 live - 2 in flight, less the unit already returned to the SKU
    assert (snap.remaining, snap.moved_out, snap.deficit, snap.closed) == (5, 1, 0, False)


def test_an_ended_sale_moves_out_what_it_did_not_sell_and_names_a_deficit() -> None:
    ended = _sale(end_at=NOW - timedelta(seconds=1))
    orders = [{"id": "A", "user_id": 1, "status": "paid", "units": 3}]
    snap = recount(
        ended, broker_events=[], voided=[], reserved=[], orders=orders, now_s=NOW.timestamp()
    )
    assert (snap.remaining, snap.moved_out, snap.closed) == (0, 7, True)
    over = recount(
        _sale(quantity=2),
        broker_events=[],
        voided=[],
        reserved=[_event("B", 2, 1)],
        orders=orders,
        now_s=NOW.timestamp(),
    )
    assert (over.remaining, over.deficit) == (0, 2)
