"""The sale dashboard's figures: one aggregate per second for every process of every host.

A snapshot of one sale joins three sources:

- Redis: the sale's live counters (remaining, allotment) and the reservations in flight;
- PostgreSQL: its orders by status and the units returned by payment expiry;
- the last reconcile's drift in the sale (units, and money findings on its orders), which
  that command stores beside the sale;
- what every gateway worker and every consumer, on whichever host, published to Redis:
  join outcomes and latency, refusals by code, consumer lag and drain, dead letters, the
  waiting room's length and admissions. Each process reads its OWN Prometheus samples once
  a second (``Publisher``, off the request path) and adds what changed since its last
  publish to that second's hash (``fs:{dash}:s:<epoch second>``, one pipelined write)
  and to the running totals (``fs:{dash}:totals``); gauges (lag, queue length) go in the
  hash under ``name|process``. The hub sums the last seconds' hashes: rates over
  ``RATE_WINDOW_S``, join p50/p99 over ``LATENCY_WINDOW_S`` from summed histogram bins,
  a gauge as each process's latest value. Prometheus ``/metrics`` stays per replica.

Only one process computes a given second's snapshot — the one that wins ``SET … NX`` on
that second's tick key — and every worker's watchers read the result from Redis: watching
costs a worker one GET a second per watched sale, whatever the number of workers or open
dashboards, and nothing on the join path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flashsale import errors
from flashsale.flash.cache import iso_ms, now_ms
from flashsale.stores import rediskeys, tasks
from flashsale.stores.rediskeys import DASH_TOTALS, dash_second

log = logging.getLogger(__name__)

JOIN_ROUTE: Final = "/api/v1/flash-sales/{sale_id}/join"
# A queued sale's shoppers may join through their admission's own URL (the sale page does).
JOIN_ROUTES: Final = frozenset((JOIN_ROUTE, JOIN_ROUTE + "/{admission}"))
# The join refusals the dashboard names, by error code (flashsale.errors); NOT_ADMITTED and
# ADMISSION_EXPIRED are a queued sale's (no admission, or one whose window passed).
REFUSAL_CODES: Final = tuple(
    refusal.code
    for refusal in (
        errors.SoldOut,
        errors.LimitExceeded,
        errors.InsufficientStock,
        errors.RateLimited,
        errors.NotAdmitted,
        errors.AdmissionExpired,
        errors.NotStarted,
        errors.SaleEnded,
        errors.ServiceUnavailable,
        errors.SaleRecovering,
    )
)
LATENCY_WINDOW_S: Final = 10  # join latency percentiles cover the last ten seconds
RATE_WINDOW_S: Final = 3  # rates: the mean of the last three complete seconds
GAUGE_FRESH_S: Final = 5  # a process silent this long no longer counts in a gauge
LAST_PUBLISH_S: Final = 2.0  # the publish on the way out waits this long at most
SECOND_TTL_S: Final = LATENCY_WINDOW_S + 50  # a second's hash outlives every reader
# The waiting room's series (flashsale/stores/metrics.py): a queued sale's length, admissions.
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
# this process's Prometheus samples, published; every process's, read back


@dataclass(slots=True)
class Totals:
    """The counters a snapshot needs, summed over every process."""

    join_by_status: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, float] = field(default_factory=dict)
    join_buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    persisted: float = 0.0
    dead_letters: float = 0.0
    lag: float = 0.0
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
    return t


def own_families(registry: CollectorRegistry | None) -> list[Metric]:
    """THIS process's samples (with a multiprocess directory too: each metric's values are
    this process's own file), never the whole folder's."""
    from prometheus_client import REGISTRY

    return list((registry or REGISTRY).collect())


# Counter fields of a second and of the totals: a fixed, small set whatever the traffic.
_REQ, _REF, _LAT = "req:", "ref:", "lat:"
_PERSISTED, _DEAD, _ADMITTED = "persisted", "dead_letters", "queue_admitted"
# Gauge fields, ``<name>|<process>`` (a sale's: ``<name>:<sale id>|<process>``).
_LAG, _QLEN = "lag", "queue_length:"


def counter_fields(t: Totals) -> dict[str, float]:
    out: dict[str, float] = {_PERSISTED: t.persisted, _DEAD: t.dead_letters}
    out.update({_REQ + st: n for st, n in t.join_by_status.items()})
    out.update({_REF + code: n for code, n in t.refusals.items()})
    out.update({_LAT + repr(le): n for le, n in t.join_buckets.items()})
    if t.queue_admitted is not None:
        out[_ADMITTED] = t.queue_admitted
    return out


def gauge_fields(t: Totals, process: str) -> dict[str, float]:
    out = {f"{_LAG}|{process}": t.lag}
    out.update({f"{_QLEN}{sid}|{process}": n for sid, n in t.queue_length.items()})
    return out


def _add_counters(t: Totals, fields: dict[str, float]) -> None:
    for name, n in fields.items():
        if name.startswith(_REQ):
            st = name[len(_REQ) :]
            t.join_by_status[st] = t.join_by_status.get(st, 0.0) + n
        elif name.startswith(_REF):
            code = name[len(_REF) :]
            t.refusals[code] = t.refusals.get(code, 0.0) + n
        elif name.startswith(_LAT):
            le = float(name[len(_LAT) :])
            t.join_buckets[le] = t.join_buckets.get(le, 0.0) + n
        elif name == _PERSISTED:
            t.persisted += n
        elif name == _DEAD:
            t.dead_letters += n
        elif name == _ADMITTED:
            t.queue_admitted = (t.queue_admitted or 0.0) + n


def _add_gauges(t: Totals, latest: dict[str, float]) -> None:
    """Each process's latest gauge values: lag summed (each consumer's own partitions),
    a sale's queue length the largest any process reports."""
    for name, n in latest.items():
        base = name.partition("|")[0]
        if base == _LAG:
            t.lag += n
        elif base.startswith(_QLEN):
            sid = base[len(_QLEN) :]
            t.queue_length[sid] = max(t.queue_length.get(sid, 0.0), n)


def _fields(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Publisher:
    """One process's figures into Redis, once a second: what changed since the last publish.

    Costs one pipelined round trip per call with a bounded number of fields (statuses,
    refusal codes, latency bins, gauges), however many requests the second carried;
    nothing on the request path. A failed write keeps its deltas for the next call.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]], process: str) -> None:
        self._collect = collect
        self._process = process
        self._sent: dict[str, float] = {}
        self.published = 0  # successful publishes
        self.last_commands = 0  # Redis commands the last one sent (the bench reports it)

    async def publish(self, redis: Redis, second: int | None = None) -> None:
        t = read_metrics(self._collect())
        changed = {
            name: round(total - self._sent.get(name, 0.0))
            for name, total in counter_fields(t).items()
        }
        # every latency bound once any moved: quantiles interpolate from the bound below
        timed = any(n for name, n in changed.items() if name.startswith(_LAT))
        deltas = {n: d for n, d in changed.items() if d or (timed and n.startswith(_LAT))}
        for name, n in deltas.items():
            # taken before the await: a second caller in this process (the consumer and
            # the gateway in one test process) sees no delta twice
            self._sent[name] = self._sent.get(name, 0.0) + n
        key = dash_second(int(time.time()) if second is None else second)
        pipe = redis.pipeline(transaction=False)
        for name, n in deltas.items():
            pipe.hincrby(key, name, n)
            pipe.hincrby(DASH_TOTALS, name, n)
        pipe.hset(key, mapping=gauge_fields(t, self._process))  # type: ignore[arg-type]
        pipe.expire(key, SECOND_TTL_S)
        try:
            self.last_commands = len(pipe)
            await pipe.execute()
        except BaseException:
            for name, n in deltas.items():
                self._sent[name] -= n
            raise
        self.published += 1


_PUBLISHERS: weakref.WeakKeyDictionary[CollectorRegistry, Publisher] = weakref.WeakKeyDictionary()


def publisher_for(registry: CollectorRegistry | None) -> Publisher:
    """The one publisher of a registry in this process (the gateway app and an in-process
    consumer sharing a registry must not publish its counts twice)."""
    from prometheus_client import REGISTRY

    reg = registry or REGISTRY
    pub = _PUBLISHERS.get(reg)
    if pub is None:
        pub = _PUBLISHERS[reg] = Publisher(functools.partial(own_families, reg), process_name())
    return pub


async def publish_every_second(
    redis: Redis,
    registry: CollectorRegistry | None,
    before: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """The once-a-second publish loop of a gateway worker or a consumer; ``before`` runs
    first (the gateway's request-stats flush). Ends when ``stop`` is set or on cancel,
    after one last publish."""
    pub = publisher_for(registry)

    async def step() -> None:
        if before is not None:
            before()
        await pub.publish(redis)

    try:
        await tasks.guarded_loop(
            step, name="dashboard publish", every_s=1.0, wait_first=True, stop=stop
        )
    finally:
        if before is not None:
            before()
        # the last second's figures, unless Redis is already gone (shutdown must not hang)
        with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
            await asyncio.wait_for(pub.publish(redis), LAST_PUBLISH_S)


@dataclass(slots=True)
class Aggregate:
    """What every process published: running totals, the last seconds' sums."""

    totals: Totals  # counters since the totals began; gauges as last published
    recent: Totals  # counters summed over the last RATE_WINDOW_S complete seconds
    latency: dict[float, float]  # join latency bins summed over LATENCY_WINDOW_S
    processes: int  # processes that published in the last GAUGE_FRESH_S seconds


async def read_aggregate(redis: Redis, second: int) -> Aggregate:
    """Every process's figures as of ``second`` (the seconds before it are complete)."""
    seconds = list(range(second - LATENCY_WINDOW_S, second + 1))
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(DASH_TOTALS)
    for s in seconds:
        pipe.hgetall(dash_second(s))
    totals_raw, *seconds_raw = await pipe.execute()
    totals = Totals()
    _add_counters(totals, _fields(totals_raw))
    recent, window = Totals(), Totals()
    latest: dict[str, float] = {}
    for s, raw in zip(seconds, seconds_raw, strict=True):
        fields = _fields(raw)
        if s < second:  # the current second is still being written
            _add_counters(window, {k: v for k, v in fields.items() if k.startswith(_LAT)})
            if s >= second - RATE_WINDOW_S:
                _add_counters(recent, fields)
        if s >= second - GAUGE_FRESH_S:
            latest.update({k: v for k, v in fields.items() if "|" in k})  # newer wins
    _add_gauges(totals, latest)
    processes = len({k.partition("|")[2] for k in latest})
    return Aggregate(totals, recent, window.join_buckets, processes)


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile (seconds) of the observations between two cumulative histogram readings,
    interpolated within its bin as Prometheus's histogram_quantile does."""
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


def waiting_room_figures(agg: Aggregate, sale_id: int) -> dict[str, Any] | None:
    length = agg.totals.queue_length.get(str(sale_id))
    if length is None:
        return None
    return {
        "queue_length": int(length),
        "admitted_per_s": (agg.recent.queue_admitted or 0.0) / RATE_WINDOW_S,
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
    # latency over the last LATENCY_WINDOW_S seconds: a single second is often empty
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
        "accepted_requests_per_s": agg.recent.join_by_status.get("202", 0.0) / RATE_WINDOW_S,
        "refusals_total": {code: int(n) for code, n in sorted(t.refusals.items()) if n},
        "refusals_per_s": {
            code: agg.recent.refusals.get(code, 0.0) / RATE_WINDOW_S
            for code, n in sorted(t.refusals.items())
            if n
        },
        "join_latency_ms": {
            "p50": None if p50 is None else round(p50 * 1000, 3),
            "p99": None if p99 is None else round(p99 * 1000, 3),
        },
        "consumer": {
            "lag": int(t.lag),
            "drain_per_s": agg.recent.persisted / RATE_WINDOW_S,
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


# ---------------------------------------------------------------------------------------
# the per-worker hub: one tick loop per watched sale, fanned out to local watchers


def _to_next_second() -> float:
    return 1.0 - (time.time() % 1.0)


def _decode(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value: dict[str, Any] = orjson.loads(raw)
    return value


class DashboardHub:
    """Per worker: one loop per sale somebody watches, shared by all its watchers."""

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, paused: Callable[[], bool] = lambda: False
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._paused = paused  # the pause-background plan: no snapshot, no history
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
        async def step() -> None:
            if self._paused():
                return
            snap = await self.tick(sale_id, int(time.time()))
            if snap is None:
                return
            self._latest[sale_id] = snap
            cond = self._changed.get(sale_id)
            if cond is not None:
                async with cond:
                    cond.notify_all()

        await tasks.guarded_loop(
            step,
            name=f"dashboard snapshot of sale {sale_id}",
            every_s=_to_next_second,
            errors=(*tasks.STORE_ERRORS, asyncpg.PostgresError),
            wait_first=True,
        )

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
        agg = await read_aggregate(self._redis, second)
        snap = await build_snapshot(self._pool, self._redis, sale_id, agg, current)
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
    pool: asyncpg.Pool, redis: Redis, paused: Callable[[], bool] = lambda: False
) -> AsyncIterator[DashboardHub]:
    hub = DashboardHub(pool, redis, paused)
    try:
        yield hub
    finally:
        await hub.close()
