"""Flash sales: the sale lifecycle in PostgreSQL, its live state in Redis, and joining.

Where a unit is counted (see ARCHITECTURE.md): PostgreSQL holds the record
(``flash_sales.quantity`` carved from the SKU; ``sold_quantity``; ``returned_quantity``),
Redis the live counters (``remaining``, per-user counts, the reservation log). For any
sale: ``allotment = remaining + log + claimed + persisted live units + moved_out``,
and moved_out − returned_quantity units are on their way back to the SKU.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from flashsale import rediskeys
from flashsale.db import Conn
from flashsale.errors import (
    AppError,
    Conflict,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    ValidationFailed,
)
from flashsale.flash.events import OrderEvent, parse_entry
from flashsale.kafka import OrderProducer, PublishFailed
from flashsale.redisbatch import OutcomeUnknown, ScriptBatcher, run_id_of
from flashsale.scripts import Release, Reserve, register
from flashsale.settings import Settings
from gateway import appkeys

log = logging.getLogger(__name__)

REFRESH_EVERY_S: Final = 0.5
MISS_TTL_S: Final = 1.0
MAX_JOIN_QUANTITY: Final = 100

# --- SQL -----------------------------------------------------------------------------------
SQL_SKU_FOR_SALE = """
SELECT s.id, s.product_id, s.price_cents, p.name
FROM skus s JOIN products p ON p.id = s.product_id WHERE s.id = $1
"""
SQL_CARVE = """
UPDATE skus SET on_hand = on_hand - $2, updated_at = now()
WHERE id = $1 AND on_hand - reserved >= $2 RETURNING on_hand
"""
SQL_INSERT_SALE = """
INSERT INTO flash_sales (sku_id, product_id, flash_price_cents, quantity, per_user_limit,
                         start_at, end_at, payment_window_s, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *
"""
SQL_LEDGER = """
INSERT INTO inventory_ledger (sku_id, order_id, delta, reason, flash_sale_id)
VALUES ($1, $2, $3, $4, $5)
"""
SQL_SALE = """
SELECT f.*, p.name AS product_name, s.price_cents AS original_price_cents
FROM flash_sales f JOIN skus s ON s.id = f.sku_id JOIN products p ON p.id = f.product_id
WHERE f.id = $1
"""
SQL_SALE_FOR_UPDATE = "SELECT * FROM flash_sales WHERE id = $1 FOR UPDATE"
SQL_TOP_UP = """
UPDATE flash_sales SET quantity = quantity + $2, updated_at = now() WHERE id = $1 RETURNING quantity
"""
SQL_SET_END = "UPDATE flash_sales SET end_at = $2, updated_at = now() WHERE id = $1"
SQL_CLOSE = """
UPDATE flash_sales SET closed_at = COALESCE(closed_at, now()), updated_at = now() WHERE id = $1
"""
SQL_SETTLE = """
WITH old AS (SELECT returned_quantity FROM flash_sales WHERE id = $1 FOR UPDATE)
UPDATE flash_sales f SET returned_quantity = $2, updated_at = now()
FROM old WHERE f.id = $1 AND old.returned_quantity < $2
RETURNING old.returned_quantity, f.sku_id
"""
SQL_RETURN_TO_SKU = "UPDATE skus SET on_hand = on_hand + $2, updated_at = now() WHERE id = $1"
SQL_ENDED_SALES = """
SELECT id FROM flash_sales
WHERE (end_at <= now() OR closed_at IS NOT NULL) AND end_at > now() - make_interval(days => $1)
ORDER BY id
"""
SQL_LIVE_SALES = "SELECT id FROM flash_sales WHERE end_at > now() AND closed_at IS NULL ORDER BY id"
SQL_CANCEL_FLASH = """
UPDATE orders SET status = 'cancelled', cancelled_at = now(), cancel_reason = $2,
       version = version + 1, updated_at = now()
WHERE id = $1 AND kind = 'flash' AND status = 'pending_payment'
RETURNING flash_sale_id, user_id
"""
SQL_ORDER_UNITS = """
SELECT sku_id, sum(quantity)::int AS units FROM order_items WHERE order_id = $1 GROUP BY sku_id
"""
SQL_SALE_SOLD_DOWN = """
UPDATE flash_sales SET sold_quantity = sold_quantity - $2, updated_at = now() WHERE id = $1
"""


# --- Redis scripts ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlashScripts:
    reserve: AsyncScript
    release: AsyncScript
    claim: AsyncScript
    return_units: AsyncScript
    load: AsyncScript
    close: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> FlashScripts:
        return cls(
            reserve=register(client, "reserve"),
            release=register(client, "release"),
            claim=register(client, "claim"),
            return_units=register(client, "return_units"),
            load=register(client, "sale_load"),
            close=register(client, "sale_close"),
        )

    async def preload(self, client: Redis) -> None:
        """SCRIPT LOAD every script so the first pipelined EVALSHA finds it."""
        for script in (
            self.reserve,
            self.release,
            self.claim,
            self.return_units,
            self.load,
            self.close,
        ):
            await client.script_load(script.script)


# --- In-process sale state -------------------------------------------------------------------
@dataclass(slots=True)
class SaleState:
    id: int
    sku_id: int
    product_id: int
    price_cents: int
    original_price_cents: int
    name: str
    per_user_limit: int
    start_ms: int
    end_ms: int
    window_ms: int
    allotment: int
    remaining: int
    moved_out: int
    closed: bool
    recovering: bool = False  # not armed under the current Redis run (see reserve.lua)

    @property
    def sold_out(self) -> bool:
        return self.remaining <= 0

    def status(self, now_ms: int) -> str:
        if self.closed or now_ms >= self.end_ms:
            return "ended"
        if now_ms < self.start_ms:
            return "upcoming"
        return "sold_out" if self.remaining <= 0 else "active"

    def public(self, now_ms: int) -> dict[str, Any]:
        sold = max(0, self.allotment - self.remaining - self.moved_out)
        return {
            "flash_sale_id": self.id,
            "product": {
                "id": self.product_id,
                "name": self.name,
                "sku_id": self.sku_id,
                "original_price": self.original_price_cents,
                "flash_price": self.price_cents,
            },
            "total_quantity": self.allotment,
            "sold_quantity": sold,
            "remaining_quantity": self.remaining,
            "per_user_limit": self.per_user_limit,
            "start_time": _iso(self.start_ms),
            "end_time": _iso(self.end_ms),
            "payment_window_s": self.window_ms // 1000,
            "status": self.status(now_ms),
        }

    @classmethod
    def from_hash(cls, sale_id: int, h: dict[Any, Any], run_id: bytes = b"") -> SaleState:
        def i(name: str) -> int:
            return int(h[name.encode()])

        return cls(
            id=sale_id,
            sku_id=i("sku"),
            product_id=i("product"),
            price_cents=i("price"),
            original_price_cents=i("original_price"),
            name=h[b"name"].decode(),
            per_user_limit=i("limit"),
            start_ms=i("start_ms"),
            end_ms=i("end_ms"),
            window_ms=i("window_ms"),
            allotment=i("allotment"),
            remaining=i("remaining"),
            moved_out=i("moved_out"),
            closed=h.get(b"closed") == b"1",
            recovering=bool(run_id) and h.get(b"armed") != run_id,
        )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SaleCache:
    """Every known sale's state, refreshed from Redis twice a second in each worker.

    Joins check the window and the sold-out flag here without any I/O; a script that
    reports sold out sets the flag at once in this worker, and the refresh spreads
    it (and its clearing after a top-up or a release) to every worker within a second.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.sales: dict[int, SaleState] = {}
        self._misses: dict[int, float] = {}
        self.run_id = b""

    async def refresh(self) -> None:
        ids = sorted(int(x) for x in await self._redis.smembers(rediskeys.SALES_INDEX))
        if not ids:
            self.sales = {}
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.execute_command("INFO", "server")
        for sale_id in ids:
            pipe.hgetall(rediskeys.sale(sale_id))
        info, *hashes = await pipe.execute()
        self.run_id = run_id_of(info).encode()
        fresh: dict[int, SaleState] = {}
        for sale_id, h in zip(ids, hashes, strict=True):
            if h and b"sku" in h:
                fresh[sale_id] = SaleState.from_hash(sale_id, h, self.run_id)
        self.sales = fresh

    async def get(self, sale_id: int) -> SaleState | None:
        state = self.sales.get(sale_id)
        if state is not None:
            return state
        missed = self._misses.get(sale_id)
        if missed is not None and time.monotonic() - missed < MISS_TTL_S:
            return None
        h = await self._redis.hgetall(rediskeys.sale(sale_id))
        if not h or b"sku" not in h:
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[sale_id] = time.monotonic()
            return None
        state = SaleState.from_hash(sale_id, h, self.run_id)
        self.sales[sale_id] = state
        return state

    def mark_sold_out(self, sale_id: int) -> None:
        state = self.sales.get(sale_id)
        if state is not None:
            state.remaining = 0


@dataclass
class FlashRuntime:
    """What the flash-sale routes need, built once per worker (see ``flash_ctx``)."""

    settings: Settings
    redis: Redis
    scripts: FlashScripts
    batcher: ScriptBatcher
    cache: SaleCache
    producer: OrderProducer


FLASH: Final = web.AppKey("flash", FlashRuntime)


async def flash_ctx(app: web.Application) -> Any:
    redis = app[appkeys.REDIS]
    scripts = FlashScripts.register(redis)
    await scripts.preload(redis)
    cache = SaleCache(redis)
    await cache.refresh()
    runtime = FlashRuntime(
        app[appkeys.SETTINGS],
        redis,
        scripts,
        ScriptBatcher(app[appkeys.SETTINGS].redis),
        cache,
        app[appkeys.PRODUCER],
    )
    app[FLASH] = runtime

    async def refresher() -> None:
        batcher, metrics = runtime.batcher, app[appkeys.METRICS]
        pipelines = metrics.redis_calls.labels("reserve_pipeline")
        calls = metrics.redis_calls.labels("reserve_call")
        seen_pipelines = seen_calls = 0
        while True:
            await asyncio.sleep(REFRESH_EVERY_S)
            pipelines.inc(batcher.round_trips - seen_pipelines)
            calls.inc(batcher.calls - seen_calls)
            seen_pipelines, seen_calls = batcher.round_trips, batcher.calls
            try:
                await cache.refresh()
            except (RedisError, OSError) as exc:
                log.warning("sale cache refresh failed: %s", exc)

    task = asyncio.create_task(refresher(), name="sale-cache-refresh")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runtime.batcher.close()


# --- Sale lifecycle --------------------------------------------------------------------------
async def load_sale(
    redis: Redis,
    scripts: FlashScripts,
    row: asyncpg.Record | dict[str, Any],
    *,
    new: bool = False,
) -> int:
    """Write a sale's state into Redis (idempotent); returns remaining.

    ``new``: the sale was just created, so its counters are the allotment and it is armed
    under the current Redis run. Otherwise a sale missing from Redis is written unarmed
    (see ``lua/sale_load.lua`` and ``consumers/recovery.py``).
    """
    static: list[Any] = [
        "sku",
        row["sku_id"],
        "product",
        row["product_id"],
        "price",
        row["flash_price_cents"],
        "original_price",
        row["original_price_cents"],
        "name",
        row["product_name"],
        "limit",
        row["per_user_limit"],
        "start_ms",
        int(row["start_at"].timestamp() * 1000),
        "end_ms",
        int(row["end_at"].timestamp() * 1000),
        "window_ms",
        row["payment_window_s"] * 1000,
    ]
    result = await scripts.load(
        keys=[rediskeys.sale(row["id"])],
        args=[row["id"], row["quantity"], 1 if new else 0, *static],
    )
    await redis.sadd(rediskeys.SALES_INDEX, row["id"])
    if row["closed_at"] is not None:
        await scripts.close(keys=[rediskeys.sale(row["id"])])
    if int(result[0]) < 0:
        raise Conflict("the sale is closed", code="SALE_ENDED")
    return int(result[0])


async def create_sale(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    *,
    sku_id: int,
    flash_price: int,
    quantity: int,
    per_user_limit: int,
    start_at: datetime,
    end_at: datetime,
    payment_window_s: int,
    created_by: int | None,
) -> dict[str, Any]:
    async with db.acquire() as conn, conn.transaction():
        sku = await conn.fetchrow(SQL_SKU_FOR_SALE, sku_id)
        if sku is None:
            raise NotFound("sku not found", code="SKU_NOT_FOUND")
        if await conn.fetchval(SQL_CARVE, sku_id, quantity) is None:
            raise Conflict(
                "not enough stock on the SKU for this allotment", code="INSUFFICIENT_STOCK"
            )
        sale = await conn.fetchrow(
            SQL_INSERT_SALE,
            sku_id,
            sku["product_id"],
            flash_price,
            quantity,
            per_user_limit,
            start_at,
            end_at,
            payment_window_s,
            created_by,
        )
        assert sale is not None
        await conn.execute(SQL_LEDGER, sku_id, None, -quantity, "flash_allot", sale["id"])
    row = await db.fetchrow(SQL_SALE, sale["id"])
    assert row is not None
    await load_sale(redis, scripts, row, new=True)
    return await sale_view(db, redis, sale["id"])


async def sale_view(db: asyncpg.Pool, redis: Redis, sale_id: int) -> dict[str, Any]:
    h = await redis.hgetall(rediskeys.sale(sale_id))
    if not h or b"sku" not in h:
        raise NotFound("flash sale not found")
    return SaleState.from_hash(sale_id, h).public(now_ms())


async def top_up(
    db: asyncpg.Pool,
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    add_quantity: int,
    end_at: datetime | None,
) -> dict[str, Any]:
    """Move units from the SKU into a running sale; PostgreSQL first, then Redis adds the
    difference to its allotment (so a retry never adds twice)."""
    async with db.acquire() as conn, conn.transaction():
        sale = await conn.fetchrow(SQL_SALE_FOR_UPDATE, sale_id)
        if sale is None:
            raise NotFound("flash sale not found")
        if sale["closed_at"] is not None or sale["end_at"] <= datetime.now(UTC):
            raise Conflict("the sale has ended", code="SALE_ENDED")
        if end_at is not None:
            if end_at <= sale["start_at"]:
                raise ValidationFailed(fields={"end_at": "must be after start_at"})
            await conn.execute(SQL_SET_END, sale_id, end_at)
        if add_quantity:
            if await conn.fetchval(SQL_CARVE, sale["sku_id"], add_quantity) is None:
                raise Conflict("not enough stock on the SKU", code="INSUFFICIENT_STOCK")
            await conn.fetchval(SQL_TOP_UP, sale_id, add_quantity)
            await conn.execute(
                SQL_LEDGER, sale["sku_id"], None, -add_quantity, "flash_topup", sale_id
            )
    row = await db.fetchrow(SQL_SALE, sale_id)
    assert row is not None
    await load_sale(redis, scripts, row)
    return await sale_view(db, redis, sale_id)


async def close_sale(
    db: asyncpg.Pool, redis: Redis, scripts: FlashScripts, sale_id: int
) -> dict[str, Any]:
    async with db.acquire() as conn:
        if await conn.fetchval("SELECT id FROM flash_sales WHERE id = $1", sale_id) is None:
            raise NotFound("flash sale not found")
        await conn.execute(SQL_CLOSE, sale_id)
    await settle_sale(db, redis, scripts, sale_id)
    return await sale_view(db, redis, sale_id)


async def settle_sale(db: asyncpg.Pool, redis: Redis, scripts: FlashScripts, sale_id: int) -> int:
    """Close the sale in Redis and return moved-out units to the SKU exactly once.

    ``moved_out`` in Redis only grows; ``returned_quantity`` in PostgreSQL catches up to it
    under a row lock, so running this any number of times, concurrently, moves each unit once.
    """
    moved = int(await scripts.close(keys=[rediskeys.sale(sale_id)]))
    if moved < 0:
        return 0
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(SQL_SETTLE, sale_id, moved)
        if row is None:
            return 0
        delta = moved - int(row["returned_quantity"])
        await conn.execute(SQL_RETURN_TO_SKU, row["sku_id"], delta)
        await conn.execute(SQL_LEDGER, row["sku_id"], None, delta, "flash_return", sale_id)
    log.info("sale %d: returned %d unit(s) to sku %d", sale_id, delta, row["sku_id"])
    return delta


# --- Joining ---------------------------------------------------------------------------------
class NotStarted(Conflict):
    code = "NOT_STARTED"
    default_message = "the sale has not started"


class SaleEnded(Conflict):
    code = "SALE_ENDED"
    default_message = "the sale has ended"


class SoldOut(Conflict):
    code = "SOLD_OUT"
    default_message = "sold out"


class LimitExceeded(Conflict):
    code = "LIMIT_EXCEEDED"
    default_message = "per-user limit reached for this sale"


class SaleRecovering(ServiceUnavailable):
    code = "SALE_RECOVERING"
    retriable = True
    default_message = (
        "the sale's stock is being recounted after a store restart; retry in a few seconds"
    )

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "2"})


class OutcomeUnknownError(ServiceUnavailable):
    """The reservation may or may not have been made: never a "no"."""

    code = "OUTCOME_UNKNOWN"
    retriable = True
    default_message = (
        "we could not confirm this join: retry with the same Idempotency-Key, "
        "or look at your orders before joining again"
    )


class IdempotencyMismatch(AppError):
    code = "IDEMPOTENCY_MISMATCH"
    http_status = 422
    default_message = "Idempotency-Key was used with a different request body"


@dataclass(frozen=True, slots=True)
class JoinResult:
    order_id: str
    payment_deadline_ms: int
    replayed: bool


def _fingerprint(quantity: int) -> str:
    return hashlib.blake2s(f"q={quantity}".encode(), digest_size=8).hexdigest()


def _rate_limited(retry_ms: int, scope: str) -> RateLimited:
    seconds = max(1, -(-retry_ms // 1000))
    return RateLimited(
        f"too many attempts ({scope}); retry in {seconds}s",
        headers={"Retry-After": str(seconds)},
        data={"retry_after_ms": retry_ms},
    )


async def join(
    rt: FlashRuntime,
    *,
    sale: SaleState,
    user_id: int,
    quantity: int,
    client_ip: str,
    idempotency_key: str | None,
    order_id: str,
) -> JoinResult:
    """Reserve with one script call, publish the event, and only then report success."""
    sid = sale.id
    idem_field = f"{user_id}:{idempotency_key}" if idempotency_key else ""
    s = rt.settings
    keys = rediskeys.reserve_keys(sid, user_id, client_ip)
    args = [
        user_id,
        quantity,
        order_id,
        idem_field,
        _fingerprint(quantity),
        s.rate_user_per_s,
        s.rate_user_burst,
        s.rate_ip_per_s,
        s.rate_ip_burst,
    ]
    try:
        res = await rt.batcher.call(rt.scripts.reserve, keys, args, with_run_id=True)
    except OutcomeUnknown as exc:
        log.warning("reserve for order %s: outcome unknown (%s)", order_id, exc)
        raise OutcomeUnknownError(data={"order_id": order_id}) from None
    except (RedisError, OSError) as exc:
        log.warning("reserve failed: %s", exc)
        raise ServiceUnavailable("reservation store unavailable; retry later") from None
    status = Reserve(int(res[0]))
    if status is Reserve.RESERVED:
        deadline = int(res[2])
        sale.remaining = int(res[3])  # the sold-out flag for this worker is set at once
        event = OrderEvent(
            order_id=order_id,
            sale_id=sid,
            user_id=user_id,
            sku_id=sale.sku_id,
            product_id=sale.product_id,
            quantity=quantity,
            price_cents=sale.price_cents,
            payment_deadline_ms=deadline,
            reserved_at_ms=now_ms(),
        )
        try:
            await rt.producer.publish(event.key, event.encode())
        except PublishFailed as exc:
            log.warning("order %s not acknowledged by the broker (%s); releasing", order_id, exc)
            released = await _compensate(rt, sid, order_id, user_id, quantity, idem_field)
            if released is Release.RELEASED:
                raise ServiceUnavailable(
                    "the order queue did not acknowledge in time; nothing was reserved, retry"
                ) from None
            if released is not Release.CLAIMED:
                raise OutcomeUnknownError(data={"order_id": order_id}) from None
            # a consumer already claimed it: the event did reach the broker, the order stands
        return JoinResult(order_id, deadline, replayed=False)
    if status is Reserve.REPLAY:
        return JoinResult(res[1].decode(), int(res[2]), replayed=True)
    raise _rejection(rt, sid, status, res)


async def _compensate(
    rt: FlashRuntime, sid: int, order_id: str, user_id: int, quantity: int, idem_field: str
) -> Release | None:
    """Release the reservation; None when Redis did not answer (outcome unknown)."""
    keys = rediskeys.release_keys(sid)
    try:
        return Release(
            int(await rt.scripts.release(keys=keys, args=[order_id, user_id, quantity, idem_field]))
        )
    except (RedisError, OSError):
        # If the reservation is still in the log, the stranded sweeper publishes it.
        log.exception("could not release %s", order_id)
        return None


def _rejection(rt: FlashRuntime, sid: int, status: Reserve, res: list[Any]) -> AppError:
    match status:
        case Reserve.IDEMPOTENCY_MISMATCH:
            return IdempotencyMismatch()
        case Reserve.USER_RATE_LIMITED:
            return _rate_limited(int(res[1]), "user")
        case Reserve.IP_RATE_LIMITED:
            return _rate_limited(int(res[1]), "client address")
        case Reserve.NOT_STARTED:
            return NotStarted()
        case Reserve.ENDED:
            return SaleEnded()
        case Reserve.LIMIT_EXCEEDED:
            first = res[1].decode() if len(res) > 1 and res[1] else None
            return LimitExceeded(data={"order_id": first} if first else None)
        case Reserve.SOLD_OUT:
            rt.cache.mark_sold_out(sid)
            return SoldOut()
        case Reserve.INSUFFICIENT:
            return Conflict(
                f"only {int(res[1])} left",
                code="INSUFFICIENT_STOCK",
                data={"remaining_quantity": int(res[1])},
            )
        case Reserve.UNKNOWN_SALE:
            if sid in rt.cache.sales:  # known a moment ago: Redis lost it
                return SaleRecovering()
            return NotFound("flash sale not found")
        case Reserve.RECOVERING:
            return SaleRecovering()
    return AppError(f"unexpected reservation status {status}")


# --- Flash orders seen by the order routes ---------------------------------------------------
async def queued_order(app: web.Application, order_id: str, user_id: int) -> dict[str, Any] | None:
    rt = app[FLASH]
    sale_ids = list(rt.cache.sales)
    if not sale_ids or not order_id.isdigit():
        return None
    pipe = rt.redis.pipeline(transaction=False)
    for sid in sale_ids:
        pipe.hget(rediskeys.log(sid), order_id)
        pipe.hget(rediskeys.claimed(sid), order_id)
    found = await pipe.execute()
    for i, sid in enumerate(sale_ids):
        entry = found[2 * i] or found[2 * i + 1]
        if entry:
            ev = parse_entry(sid, order_id, entry)
            if ev.user_id != user_id:
                return None
            return {
                "order_id": order_id,
                "status": "queued",
                "kind": "flash",
                "flash_sale_id": sid,
                "items": [
                    {
                        "product_id": ev.product_id,
                        "sku_id": ev.sku_id,
                        "quantity": ev.quantity,
                        "price": ev.price_cents,
                        "subtotal": ev.price_cents * ev.quantity,
                    }
                ],
                "total_amount": ev.price_cents * ev.quantity,
                "payment_deadline": _iso(ev.payment_deadline_ms),
                "created_at": _iso(ev.reserved_at_ms),
            }
    return None


async def cancel_order(
    app: web.Application | None, conn: Conn, order_id: str, *, reason: str
) -> bool:
    """PostgreSQL side of cancelling an unpaid flash order, inside the caller's transaction.

    The units go back to Redis after the transaction commits, through
    :func:`return_cancelled_units` (run by the sweeper), so a rolled-back cancel never
    returns units that are still sold.
    """
    row = await conn.fetchrow(SQL_CANCEL_FLASH, order_id, reason)
    if row is None:
        return False
    for item in await conn.fetch(SQL_ORDER_UNITS, order_id):
        await conn.execute(SQL_SALE_SOLD_DOWN, row["flash_sale_id"], item["units"])
        await conn.execute(
            SQL_LEDGER,
            item["sku_id"],
            order_id,
            item["units"],
            "flash_cancel",
            row["flash_sale_id"],
        )
    return True
