"""One sale's snapshot: the sale in Redis, its orders in PostgreSQL, every process's figures."""

from __future__ import annotations

from typing import Any, Final

import asyncpg
from redis.asyncio import Redis

from flashsale.dashboard.aggregate import Aggregate, quantile
from flashsale.dashboard.sales import sale_status
from flashsale.flash.cache import iso_ms, now_ms
from flashsale.stores import rediskeys
from flashsale.timing import DASH_RATE_WINDOW_S

ORDER_STATUSES: Final = ("queued", "pending_payment", "paid", "cancelled")

# The sale's orders by status from the counters its orders' triggers keep (migration 0120),
# summed over their slots: a few rows, where counting the orders took 82 ms at 360k orders.
# A status none of the sale's orders is in is left out, as a count of the orders would.
SQL_ORDERS_BY_STATUS: Final = """
SELECT status, sum(orders)::bigint AS n, sum(expired)::bigint AS expired
FROM flash_sale_order_counts WHERE flash_sale_id = $1
GROUP BY status HAVING sum(orders) <> 0
ORDER BY status
"""


def _rate(now: float, before: float | None, seconds: float) -> float:
    if before is None or seconds <= 0:
        return 0.0
    return max(0.0, now - before) / seconds


def waiting_room_figures(agg: Aggregate, sale_id: int) -> dict[str, Any] | None:
    length = agg.totals.queue_length.get(str(sale_id))
    if length is None:
        return None
    return {
        "queue_length": int(length),
        "admitted_per_s": (agg.recent.queue_admitted or 0.0) / DASH_RATE_WINDOW_S,
    }


async def _orders(pool: asyncpg.Pool, sale_id: int) -> tuple[dict[str, int], int]:
    rows = await pool.fetch(SQL_ORDERS_BY_STATUS, sale_id)
    by_status = {r["status"]: int(r["n"]) for r in rows}
    expired = sum(int(r["expired"]) for r in rows)
    return by_status, expired


async def build_snapshot(
    pool: asyncpg.Pool,
    redis: Redis,
    sale_id: int,
    agg: Aggregate,
    previous: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The dashboard's figures for one sale now: every process's (``agg``), the sale's
    units accepted per second against ``previous``.

    None when the sale is not loaded in Redis.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(rediskeys.sale(sale_id))
    pipe.hlen(rediskeys.log(sale_id))
    pipe.hlen(rediskeys.claimed(sale_id))
    pipe.get(rediskeys.dash_drift(sale_id))
    pipe.get(rediskeys.dash_money_drift(sale_id))
    h, in_log, in_claim, drift, money_drift = await pipe.execute()
    if not h or b"sku" not in h:
        return None
    by_status, expired = await _orders(pool, sale_id)
    t = agg.totals
    now = now_ms()

    def i(name: str) -> int:
        return int(h.get(name.encode(), b"0"))

    allotment, remaining, moved_out = i("allotment"), i("remaining"), i("moved_out")
    accepted_units = max(0, allotment - remaining - moved_out)
    prev_totals = (previous or {}).get("totals") or {}
    seconds = (now - previous["t"]) / 1000 if previous else 0.0
    prev_units = prev_totals.get("accepted_units")
    # latency over the last DASH_LATENCY_WINDOW_S seconds: a single second is often empty
    p50 = quantile(0.5, {}, agg.latency)
    p99 = quantile(0.99, {}, agg.latency)
    start, end = i("start_ms"), i("end_ms")
    closed = h.get(b"closed") == b"1"
    orders = {s: by_status.get(s, 0) for s in ORDER_STATUSES}
    orders["queued"] = int(in_log) + int(in_claim)
    for other, n in by_status.items():
        if other not in orders:
            orders[other] = n
    return {
        "t": now,
        "sale": {
            "flash_sale_id": sale_id,
            "product_name": h.get(b"name", b"").decode(),
            "flash_price": i("price"),
            "original_price": i("original_price"),
            "total_quantity": allotment,
            "remaining_quantity": remaining,
            "start_time": iso_ms(start),
            "end_time": iso_ms(end),
            "status": sale_status(
                now=now, start_ms=start, end_ms=end, closed=closed, remaining=remaining
            ),
        },
        "accepted_units": accepted_units,
        "accepted_per_s": _rate(accepted_units, prev_units, seconds),
        "accepted_requests_per_s": agg.recent.join_by_status.get("202", 0.0) / DASH_RATE_WINDOW_S,
        "refusals_total": {code: int(n) for code, n in sorted(t.refusals.items()) if n},
        "refusals_per_s": {
            code: agg.recent.refusals.get(code, 0.0) / DASH_RATE_WINDOW_S
            for code, n in sorted(t.refusals.items())
            if n
        },
        "join_latency_ms": {
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
        },
        "consumer": {
            "lag": int(t.lag),
            "drain_per_s": agg.recent.persisted / DASH_RATE_WINDOW_S,
            "persisted_total": int(t.persisted),
        },
        "processes": agg.processes,  # gateway workers and consumers heard from
        "dead_letters": int(t.dead_letters),
        "orders": orders,
        "expiry_returns": expired,
        "reconcile_drift": None if drift is None else int(drift),
        "reconcile_money_drift": None if money_drift is None else int(money_drift),
        # A queued sale's waiting room: None (the page hides the tile) until the waiting
        # room's metrics carry this sale. Admissions are counted for all sales together.
        "waiting_room": waiting_room_figures(agg, sale_id),
        "totals": {**t.as_json(), "accepted_units": accepted_units},
    }


# The figures of the whole platform, every sale and every process together: what they say
# about other merchants' sales and about the service itself is for admins alone.
PLATFORM_FIGURES: Final = frozenset(
    (
        "accepted_requests_per_s",
        "refusals_total",
        "refusals_per_s",
        "join_latency_ms",
        "consumer",
        "processes",
        "dead_letters",
    )
)


def merchant_view(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot (or a history point) as a merchant sees it: its sale's own figures only."""
    out = {k: v for k, v in snap.items() if k not in PLATFORM_FIGURES}
    if "totals" in snap:
        out["totals"] = {"accepted_units": snap["totals"].get("accepted_units")}
    room = snap.get("waiting_room")
    if room is not None:  # admissions are counted for every sale together
        out["waiting_room"] = {"queue_length": room["queue_length"]}
    return out
