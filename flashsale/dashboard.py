"""The sale dashboard's figures: one aggregate per second for all gateway workers.

A snapshot of one sale joins three sources:

- Redis: the sale's live counters (remaining, allotment) and the reservations in flight;
- PostgreSQL: its orders by status and the units returned by payment expiry;
- Prometheus samples of every process (the multiprocess directory, or this process's
  registry without one): join outcomes and latency, refusals by code, consumer lag and
  drain, dead letters, reconcile drift.

Rates need the previous totals, so each snapshot carries its raw ``totals`` and the next
one is computed against it. Only one process computes a given second's snapshot — the one
that wins ``SET … NX`` on that second's tick key — and every worker's watchers read the
result from Redis: watching costs a worker one GET a second per watched sale, whatever the
number of workers or open dashboards, and nothing on the join path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale import rediskeys, tasks
from flashsale.flash.cache import iso_ms, now_ms

log = logging.getLogger(__name__)

JOIN_ROUTE: Final = "/api/v1/flash-sales/{sale_id}/join"
# A queued sale's shoppers may join through their admission's own URL (the sale page does).
JOIN_ROUTES: Final = frozenset((JOIN_ROUTE, JOIN_ROUTE + "/{admission}"))
# The join refusals the dashboard names, by error code (flashsale.errors); NOT_ADMITTED and
# ADMISSION_EXPIRED are a queued sale's (no admission, or one whose window passed).
REFUSAL_CODES: Final = (
    "SOLD_OUT",
    "LIMIT_EXCEEDED",
    "INSUFFICIENT_STOCK",
    "RATE_LIMITED",
    "NOT_ADMITTED",
    "ADMISSION_EXPIRED",
    "NOT_STARTED",
    "SALE_ENDED",
    "RETRY_LATER",
    "SALE_RECOVERING",
)
LATENCY_WINDOW_S: Final = 10  # join latency percentiles cover the last ten snapshots
# The waiting room's series (its branch exports them): a queued sale's length, admissions.
QUEUE_LENGTH: Final = "flashsale_queue_length"
QUEUE_ADMITTED: Final = "flashsale_queue_admitted_total"
HISTORY_POINTS: Final = 300  # five minutes of one-second snapshots
SNAPSHOT_TTL_S: Final = 30
TICK_KEY_TTL_S: Final = 10
# A worker that lost the tick waits this long (at most this many times) for the winner's
# snapshot of the second.
READ_RETRY_S: Final = 0.2
READ_RETRIES: Final = 4
ORDER_STATUSES: Final = ("queued", "pending_payment", "paid", "cancelled")

SQL_SALES: Final = """
SELECT fs.id, fs.sku_id, fs.product_id, p.name, p.merchant_id, fs.flash_price_cents,
       fs.quantity, fs.sold_quantity, fs.start_at, fs.end_at, fs.closed_at
FROM flash_sales fs JOIN products p ON p.id = fs.product_id
WHERE $1::bigint IS NULL OR p.merchant_id = $1
ORDER BY fs.start_at DESC, fs.id DESC
LIMIT $2
"""
SQL_SALE_MERCHANT: Final = """
SELECT p.merchant_id FROM flash_sales fs JOIN products p ON p.id = fs.product_id
WHERE fs.id = $1
"""
SQL_ORDERS_BY_STATUS: Final = """
SELECT status, count(*) AS n,
       count(*) FILTER (WHERE cancel_reason = 'payment_timeout') AS expired
FROM orders WHERE flash_sale_id = $1
GROUP BY status
"""


# ---------------------------------------------------------------------------------------
# the list of sales


def sale_status(
    *, now: int, start_ms: int, end_ms: int, closed: bool, remaining: int | None
) -> str:
    """upcoming / active / sold_out / ended / closed, as a person running the sale says it."""
    if closed:
        return "closed"
    if now >= end_ms:
        return "ended"
    if now < start_ms:
        return "upcoming"
    return "sold_out" if remaining is not None and remaining <= 0 else "active"


async def list_sales(
    pool: asyncpg.Pool,
    redis: Redis,
    *,
    merchant_id: int | None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """The sales a dashboard lists (a merchant's own when ``merchant_id`` is given), newest
    first, with Redis's live remaining where the sale is loaded there."""
    rows = await pool.fetch(SQL_SALES, merchant_id, limit)
    if not rows:
        return []
    pipe = redis.pipeline(transaction=False)
    for r in rows:
        pipe.hmget(rediskeys.sale(r["id"]), "remaining", "allotment", "closed")
    live = await pipe.execute()
    now = now_ms()
    out = []
    for r, (remaining, allotment, closed_flag) in zip(rows, live, strict=True):
        start = int(r["start_at"].timestamp() * 1000)
        end = int(r["end_at"].timestamp() * 1000)
        closed = r["closed_at"] is not None or closed_flag == b"1"
        left = int(remaining) if remaining is not None else None
        total = int(allotment) if allotment is not None else r["quantity"]
        out.append(
            {
                "flash_sale_id": r["id"],
                "product_name": r["name"],
                "sku_id": r["sku_id"],
                "flash_price": r["flash_price_cents"],
                "merchant_id": r["merchant_id"],
                "total_quantity": total,
                "remaining_quantity": left,
                "start_time": iso_ms(start),
                "end_time": iso_ms(end),
                "status": sale_status(
                    now=now, start_ms=start, end_ms=end, closed=closed, remaining=left
                ),
            }
        )
    return out


async def sale_merchant(pool: asyncpg.Pool, sale_id: int) -> int | None:
    """The merchant whose product a sale sells, or None for an unknown sale."""
    merchant: int | None = await pool.fetchval(SQL_SALE_MERCHANT, sale_id)
    return merchant


# ---------------------------------------------------------------------------------------
# reading every process's Prometheus samples


@dataclass(slots=True)
class Totals:
    """The counters a snapshot needs, summed over every process."""

    join_by_status: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, float] = field(default_factory=dict)
    join_buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    persisted: float = 0.0
    dead_letters: float = 0.0
    lag: float = 0.0
    drift: dict[str, float] = field(default_factory=dict)  # sale id → units
    # the waiting room's (built separately): present once its metrics are exported
    queue_length: dict[str, float] = field(default_factory=dict)  # sale id → shoppers
    queue_admitted: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "join_by_status": self.join_by_status,
            "refusals": self.refusals,
            # le as text: JSON has no infinity ("+Inf" reads back with float())
            "join_buckets": [[repr(le), n] for le, n in sorted(self.join_buckets.items())],
            "persisted": self.persisted,
            "dead_letters": self.dead_letters,
            "queue_admitted": self.queue_admitted,
        }


def read_metrics(families: Iterable[Metric]) -> Totals:
    """Pick the dashboard's figures out of collected metric families."""
    t = Totals()
    for fam in families:
        for s in fam.samples:
            labels = s.labels
            if s.name == "flashsale_http_requests_total":
                if labels.get("route") in JOIN_ROUTES and labels.get("method") == "POST":
                    st = labels.get("status", "")
                    t.join_by_status[st] = t.join_by_status.get(st, 0.0) + s.value
            elif s.name == "flashsale_http_request_duration_seconds_bucket":
                if labels.get("route") in JOIN_ROUTES and labels.get("method") == "POST":
                    le = float(labels["le"])
                    t.join_buckets[le] = t.join_buckets.get(le, 0.0) + s.value
            elif s.name == "flashsale_errors_total":
                code = labels.get("code", "")
                if code in REFUSAL_CODES:
                    t.refusals[code] = t.refusals.get(code, 0.0) + s.value
            elif s.name == "flashsale_consumer_orders_persisted_total":
                t.persisted += s.value
            elif s.name == "flashsale_consumer_dead_letters_total":
                t.dead_letters += s.value
            elif s.name == "flashsale_consumer_lag":
                t.lag += s.value
            elif s.name == QUEUE_LENGTH:
                sid = labels.get("sale_id", "")
                t.queue_length[sid] = t.queue_length.get(sid, 0.0) + s.value
            elif s.name == QUEUE_ADMITTED:
                t.queue_admitted = (t.queue_admitted or 0.0) + s.value
            elif s.name == "flashsale_reconcile_drift_units":
                sid = labels.get("sale_id", "")
                t.drift[sid] = max(t.drift.get(sid, 0.0), s.value)
    return t


def collect_families(registry: CollectorRegistry | None) -> list[Metric]:
    """Every process's samples (multiprocess directory) or this process's registry's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        return list(MultiProcessCollector(merged).collect())  # type: ignore[no-untyped-call]
    from prometheus_client import REGISTRY

    return list((registry or REGISTRY).collect())


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile (seconds) of the observations between two cumulative bucket readings,
    interpolated within its bucket as Prometheus's histogram_quantile does."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if math.isinf(b):
                return lower
            span = c - below
            return lower + (b - lower) * ((rank - below) / span if span > 0 else 1.0)
        lower, below = b, c
    return lower


# ---------------------------------------------------------------------------------------
# one snapshot


def _rate(now: float, before: float | None, seconds: float) -> float:
    if before is None or seconds <= 0:
        return 0.0
    return max(0.0, now - before) / seconds


def waiting_room_figures(
    t: Totals, sale_id: int, prev_totals: dict[str, Any], seconds: float
) -> dict[str, Any] | None:
    length = t.queue_length.get(str(sale_id))
    if length is None:
        return None
    admitted = t.queue_admitted or 0.0
    return {
        "queue_length": int(length),
        "admitted_per_s": _rate(admitted, prev_totals.get("queue_admitted"), seconds),
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
    families: list[Metric],
    previous: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The dashboard's figures for one sale now, with rates against ``previous``.

    None when the sale is not loaded in Redis.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(rediskeys.sale(sale_id))
    pipe.hlen(rediskeys.log(sale_id))
    pipe.hlen(rediskeys.claimed(sale_id))
    h, in_log, in_claim = await pipe.execute()
    if not h or b"sku" not in h:
        return None
    by_status, expired = await _orders(pool, sale_id)
    t = read_metrics(families)
    now = now_ms()

    def i(name: str) -> int:
        return int(h.get(name.encode(), b"0"))

    allotment, remaining, moved_out = i("allotment"), i("remaining"), i("moved_out")
    accepted_units = max(0, allotment - remaining - moved_out)
    prev_totals = (previous or {}).get("totals") or {}
    seconds = (now - previous["t"]) / 1000 if previous else 0.0
    prev_units = prev_totals.get("accepted_units")
    prev_join = prev_totals.get("join_by_status") or {}
    prev_ref = prev_totals.get("refusals") or {}
    # latency over the last LATENCY_WINDOW_S seconds: a single second is often empty
    ring: list[list[list[Any]]] = list(prev_totals.get("join_buckets_ring") or [])
    oldest = ring[0] if ring else prev_totals.get("join_buckets") or []
    prev_buckets = {float(le): n for le, n in oldest}
    accepted_requests = t.join_by_status.get("202", 0.0)
    latency_before = prev_buckets if previous else {}
    p50 = quantile(0.5, latency_before, t.join_buckets)
    p99 = quantile(0.99, latency_before, t.join_buckets)
    drift = t.drift.get(str(sale_id))
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
        "accepted_requests_per_s": _rate(
            accepted_requests, prev_join.get("202") if previous else None, seconds
        ),
        "refusals_total": {code: int(n) for code, n in sorted(t.refusals.items()) if n},
        "refusals_per_s": {
            code: _rate(n, prev_ref.get(code, 0.0) if previous else None, seconds)
            for code, n in sorted(t.refusals.items())
            if n
        },
        "join_latency_ms": {
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
        },
        "consumer": {
            "lag": int(t.lag),
            "drain_per_s": _rate(t.persisted, prev_totals.get("persisted"), seconds),
        },
        "dead_letters": int(t.dead_letters),
        "orders": orders,
        "expiry_returns": expired,
        "reconcile_drift": None if drift is None else int(drift),
        # A queued sale's waiting room: None (the page hides the tile) until the waiting
        # room's metrics carry this sale. Admissions are counted for all sales together.
        "waiting_room": waiting_room_figures(t, sale_id, prev_totals, seconds),
        "totals": {
            **t.as_json(),
            "accepted_units": accepted_units,
            "join_buckets_ring": [*ring, t.as_json()["join_buckets"]][-LATENCY_WINDOW_S:],
        },
    }


# ---------------------------------------------------------------------------------------
# the per-worker hub: one tick loop per watched sale, fanned out to local watchers


def _decode(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value: dict[str, Any] = orjson.loads(raw)
    return value


class DashboardHub:
    """Per worker: one loop per sale somebody watches, shared by all its watchers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        families: Callable[[], list[Metric]],
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._families = families
        self._latest: dict[int, dict[str, Any]] = {}
        self._watchers: dict[int, int] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._changed: dict[int, asyncio.Condition] = {}
        self.computed = 0  # snapshots this worker computed (the others it read)
        self._closing = False

    async def history(self, sale_id: int) -> list[dict[str, Any]]:
        raw = await self._redis.lrange(rediskeys.dash_history(sale_id), 0, -1)
        return [snap for snap in (_decode(r) for r in raw) if snap is not None]

    async def watch(
        self, sale_id: int, idle_s: float = 15.0
    ) -> AsyncGenerator[dict[str, Any] | None]:
        """Every new snapshot of ``sale_id`` from now on (about one a second); None after
        ``idle_s`` without one (the sale is not in Redis, or the stores are down)."""
        cond = self._changed.setdefault(sale_id, asyncio.Condition())
        self._watchers[sale_id] = self._watchers.get(sale_id, 0) + 1
        if sale_id not in self._tasks:
            self._tasks[sale_id] = asyncio.create_task(
                self._run(sale_id), name=f"dashboard-{sale_id}"
            )
        seen = 0
        try:
            while True:
                try:
                    async with cond:
                        await asyncio.wait_for(
                            cond.wait_for(functools.partial(self._news, sale_id, seen)),
                            idle_s,
                        )
                except TimeoutError:
                    yield None
                    continue
                if self._closing:
                    return
                snap = self._latest[sale_id]
                seen = snap["t"]
                yield snap
        finally:
            self._watchers[sale_id] -= 1
            if not self._watchers[sale_id]:
                del self._watchers[sale_id]
                self._latest.pop(sale_id, None)  # a later watcher must not start from it
                task = self._tasks.pop(sale_id, None)
                if task is not None:
                    task.cancel()

    def _news(self, sale_id: int, seen: int) -> bool:
        return self._closing or self._latest.get(sale_id, {}).get("t", 0) > seen

    async def close(self) -> None:
        """Stop every loop and end every watcher's stream (the gateway is shutting down)."""
        self._closing = True
        for cond in self._changed.values():
            async with cond:
                cond.notify_all()
        loops = list(self._tasks.values())
        self._tasks.clear()
        await tasks.stop(*loops)

    async def _run(self, sale_id: int) -> None:
        while True:
            await asyncio.sleep(1.0 - (time.time() % 1.0))
            try:
                snap = await self.tick(sale_id, int(time.time()))
            except (RedisError, OSError, asyncpg.PostgresError) as exc:
                if tasks.cancel_requested():
                    raise asyncio.CancelledError from None
                log.warning("dashboard snapshot of sale %s failed: %s", sale_id, exc)
                continue
            if snap is None:
                continue
            self._latest[sale_id] = snap
            cond = self._changed.get(sale_id)
            if cond is not None:
                async with cond:
                    cond.notify_all()

    async def tick(self, sale_id: int, second: int) -> dict[str, Any] | None:
        """This second's snapshot: computed here if this worker wins the tick, else read."""
        key = rediskeys.dash_snapshot(sale_id)
        current = _decode(await self._redis.get(key))
        if current is not None and current.get("second", 0) >= second:
            return current
        won = await self._redis.set(
            rediskeys.dash_tick(sale_id, second), os.getpid(), nx=True, ex=TICK_KEY_TTL_S
        )
        if not won:
            for _ in range(READ_RETRIES):
                await asyncio.sleep(READ_RETRY_S)
                current = _decode(await self._redis.get(key))
                if current is not None and current.get("second", 0) >= second:
                    return current
            return current
        families = await asyncio.to_thread(self._families)
        snap = await build_snapshot(self._pool, self._redis, sale_id, families, current)
        if snap is None:
            return None
        snap["second"] = second
        self.computed += 1
        raw = orjson.dumps(snap)
        point = orjson.dumps({k: v for k, v in snap.items() if k != "totals"})
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(key, raw, ex=SNAPSHOT_TTL_S)
        pipe.rpush(rediskeys.dash_history(sale_id), point)
        pipe.ltrim(rediskeys.dash_history(sale_id), -HISTORY_POINTS, -1)
        pipe.expire(rediskeys.dash_history(sale_id), HISTORY_POINTS)
        await pipe.execute()
        return snap


@contextlib.asynccontextmanager
async def open_hub(
    pool: asyncpg.Pool, redis: Redis, registry: CollectorRegistry | None
) -> AsyncIterator[DashboardHub]:
    hub = DashboardHub(pool, redis, lambda: collect_families(registry))
    try:
        yield hub
    finally:
        await hub.close()
