"""Joining a flash sale: one reserve script call, the order event, compensation, rejections."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from flashsale import rediskeys
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
from flashsale.flash.cache import SaleState, now_ms
from flashsale.flash.events import OrderEvent
from flashsale.flash.runtime import FlashRuntime
from flashsale.kafka import PublishFailed
from flashsale.redisbatch import OutcomeUnknown
from flashsale.scripts import Release, Reserve

log = logging.getLogger(__name__)

MAX_JOIN_QUANTITY: Final = 100


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
    request_id: str = "",
) -> JoinResult:
    """Reserve with one script call, publish the event, and only then report success."""
    sid = sale.id
    idem_field = f"{user_id}:{idempotency_key}" if idempotency_key else ""
    s = rt.settings
    ids = {"order_id": order_id, "sale_id": sid, "request_id": request_id}
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
        log.warning("reserve for order %s: outcome unknown (%s)", order_id, exc, extra=ids)
        raise OutcomeUnknownError(data={"order_id": order_id}) from None
    except (RedisError, OSError) as exc:
        log.warning("reserve failed: %s", exc, extra=ids)
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
            request_id=request_id,
        )
        try:
            await rt.producer.publish(event.key, event.encode())
        except PublishFailed as exc:
            log.warning(
                "order %s not acknowledged by the broker (%s); releasing", order_id, exc, extra=ids
            )
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
            return InsufficientStock(
                f"only {int(res[1])} left",
                data={"remaining_quantity": int(res[1])},
            )
        case Reserve.UNKNOWN_SALE:
            if sid in rt.cache.sales:  # known a moment ago: Redis lost it
                return SaleRecovering()
            return NotFound("flash sale not found")
        case Reserve.RECOVERING:
            return SaleRecovering()
    return AppError(f"unexpected reservation status {status}")
