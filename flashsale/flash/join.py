"""Joining a flash sale: one reserve script call, the order event, compensation, rejections."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Final

from flashsale.errors import (
    AppError,
    IdempotencyMismatch,
    InsufficientStock,
    LimitExceeded,
    NotFound,
    NotStarted,
    OutcomeUnknownError,
    RateLimited,
    SaleEnded,
    SaleRecovering,
    ServiceUnavailable,
    SoldOut,
)
from flashsale.flash import buckets as bucketing
from flashsale.flash.cache import SaleState, now_ms
from flashsale.flash.events import OrderEvent
from flashsale.flash.runtime import FlashRuntime
from flashsale.stores import rediskeys
from flashsale.stores.kafka import PublishFailed
from flashsale.stores.redisbatch import OutcomeUnknown
from flashsale.stores.redisclient import leaks_as_connection_errors
from flashsale.stores.scripts import (
    AGAIN,
    Release,
    Reserve,
    ReserveResult,
    parse_reserve,
    reserve_args,
)
from flashsale.stores.tasks import STORE_ERRORS

log = logging.getLogger(__name__)

MAX_JOIN_QUANTITY: Final = 100
MAX_REFILLS: Final = 3  # home bucket refilled and the attempt made again at most this often


@dataclass(frozen=True, slots=True)
class JoinResult:
    order_id: str
    payment_deadline_ms: int
    replayed: bool


@functools.cache  # a join's quantity is 1 to MAX_JOIN_QUANTITY: a handful of strings
def _fingerprint(quantity: int) -> str:
    return hashlib.blake2s(f"q={quantity}".encode(), digest_size=8).hexdigest()


def _rate_limited(retry_ms: int, scope: str) -> RateLimited:
    seconds = max(1, -(-retry_ms // 1000))
    return RateLimited(
        f"too many attempts ({scope}); retry in {seconds}s",
        headers={"Retry-After": str(seconds)},
        data={"retry_after_ms": retry_ms},
    )


def ip_share(rate_per_s: float, burst: int, buckets: int) -> tuple[float, float]:
    """The per-address rate and burst each bucket of a sale grants.

    An address's shoppers live in different home buckets, each on a slot of its own, so no
    one counter can see all of an address's joins in the one script call a join makes.
    Each bucket grants its share instead and the shares add up to the sale's limit (a
    burst share never below one attempt, or a bucket would refuse everyone for ever).
    """
    if buckets <= 1:
        return rate_per_s, burst
    return rate_per_s / buckets, max(1.0, burst / buckets)


async def join(
    rt: FlashRuntime,
    *,
    sale: SaleState,
    user_id: int,
    quantity: int,
    client_ip: str,
    idempotency_key: str | None,
    order_id: str,
    request_id: str = "",
    address_id: int | None = None,
) -> JoinResult:
    """Reserve with one script call, publish the event, and only then report success.

    A sale split into buckets reserves in the shopper's home bucket; only when that one
    has too few units left are units moved in from the others (a few more round trips,
    at the end of a sale) and the same attempt made again.
    """
    sid = sale.id
    idem_field = f"{user_id}:{idempotency_key}" if idempotency_key else ""
    s = rt.settings
    ids = {"order_id": order_id, "sale_id": sid, "request_id": request_id}
    bucket = bucketing.home(user_id, sale.buckets)
    keys = rediskeys.reserve_keys(sid, user_id, client_ip, bucket)
    args = reserve_args(
        user_id,
        quantity,
        order_id,
        idem_field,
        _fingerprint(quantity),
        s.rate_user_per_s,
        s.rate_user_burst,
        *ip_share(s.rate_ip_per_s, s.rate_ip_burst, sale.buckets),
    )
    res = await _reserve(rt, keys, args, ids)
    status = res.status
    refills = 0
    while status in (Reserve.SOLD_OUT, Reserve.INSUFFICIENT) and sale.buckets > 1:
        if refills == MAX_REFILLS:  # units are there but others of this bucket took them
            raise ServiceUnavailable("the sale's stock is being rebalanced; retry")
        refills += 1
        left = res.remaining
        try:
            moved = await bucketing.refill(
                rt.redis, rt.scripts, sid, sale.buckets, bucket, quantity - left
            )
        except STORE_ERRORS as exc:
            log.warning("refilling bucket %d failed: %s", bucket, exc, extra=ids)
            raise ServiceUnavailable("reservation store unavailable; retry later") from None
        if not moved.moved:
            if moved.recovering:
                raise SaleRecovering()
            if moved.in_transit:
                raise ServiceUnavailable("the sale's stock is being rebalanced; retry")
            if status is Reserve.SOLD_OUT and moved.every_bucket_empty:
                rt.cache.mark_sold_out(sid)
            break
        res = await _reserve(rt, keys, [*args, AGAIN], ids)  # no second rate-limit token
        status = res.status
    if status is Reserve.RESERVED:
        deadline = res.deadline_ms
        if sale.buckets == 1:
            sale.remaining = res.remaining  # the sold-out flag for this worker is set at once
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
            request_id=request_id,
            address_id=address_id,
        )
        try:
            await rt.producer.publish(event.key, event.encode())
        except PublishFailed as exc:
            log.warning(
                "order %s not acknowledged by the broker (%s); releasing", order_id, exc, extra=ids
            )
            released = await _compensate(rt, sid, bucket, order_id, user_id, quantity, idem_field)
            if released is Release.RELEASED:
                raise ServiceUnavailable(
                    "the order queue did not acknowledge in time; nothing was reserved, retry"
                ) from None
            if released is not Release.CLAIMED:
                # not found, or PROMISED by an answer that named it to the shopper (a
                # replay, LIMIT_EXCEEDED), which the stranded sweeper's publish keeps true:
                # this attempt's keyed retry learns which
                raise OutcomeUnknownError(data={"order_id": order_id}) from None
            # a consumer already claimed it: the event did reach the broker, the order stands
        return JoinResult(order_id, deadline, replayed=False)
    if status is Reserve.REPLAY:
        return JoinResult(res.order_id, res.deadline_ms, replayed=True)
    raise _rejection(rt, sale, status, res)


async def _reserve(
    rt: FlashRuntime, keys: list[str], args: list[Any], ids: dict[str, Any]
) -> ReserveResult:
    try:
        res = await rt.batcher.call(rt.scripts.reserve, keys, args, with_run_id=True)
    except OutcomeUnknown as exc:
        log.warning("reserve for order %s: outcome unknown (%s)", ids["order_id"], exc, extra=ids)
        raise OutcomeUnknownError(data={"order_id": ids["order_id"]}) from None
    except STORE_ERRORS as exc:
        log.warning("reserve failed: %s", exc, extra=ids)
        raise ServiceUnavailable("reservation store unavailable; retry later") from None
    return parse_reserve(res)


async def _compensate(
    rt: FlashRuntime,
    sid: int,
    bucket: int,
    order_id: str,
    user_id: int,
    quantity: int,
    idem_field: str,
) -> Release | None:
    """Release the reservation; None when Redis did not answer (outcome unknown)."""
    keys = rediskeys.release_keys(sid, bucket)
    try:
        with leaks_as_connection_errors():
            code = await rt.scripts.release(
                keys=keys, args=[order_id, user_id, quantity, idem_field]
            )
        return Release(int(code))
    except STORE_ERRORS:
        # If the reservation is still in the log, the stranded sweeper publishes it.
        log.exception("could not release %s", order_id)
        return None


def _rejection(rt: FlashRuntime, sale: SaleState, status: Reserve, res: ReserveResult) -> AppError:
    sid = sale.id
    match status:
        case Reserve.IDEMPOTENCY_MISMATCH:
            return IdempotencyMismatch()
        case Reserve.USER_RATE_LIMITED:
            return _rate_limited(res.retry_ms, "user")
        case Reserve.IP_RATE_LIMITED:
            return _rate_limited(res.retry_ms, "client address")
        case Reserve.NOT_STARTED:
            return NotStarted()
        case Reserve.ENDED:
            return SaleEnded()
        case Reserve.LIMIT_EXCEEDED:
            return LimitExceeded(data={"order_id": res.order_id} if res.order_id else None)
        case Reserve.SOLD_OUT:
            if sale.buckets == 1:  # a split sale's flag: when every bucket is empty (above)
                rt.cache.mark_sold_out(sid)
            return SoldOut()
        case Reserve.INSUFFICIENT:
            return InsufficientStock(
                f"only {res.remaining} left",
                data={"remaining_quantity": res.remaining},
            )
        case Reserve.UNKNOWN_SALE:
            if sid in rt.cache.sales:  # known a moment ago: Redis lost it
                return SaleRecovering()
            return NotFound("flash sale not found")
        case Reserve.RECOVERING:
            return SaleRecovering()
    return AppError(f"unexpected reservation status {status}")
