"""One hot sale split into buckets, each on a Redis Cluster slot of its own.

A sale created with ``buckets`` N > 1 keeps N copies of its keys (``rediskeys``: bucket 0
under ``{sale:<id>}``, bucket k under ``{sale:<id>:b<k>}``), so its joins spread over the
cluster's shards instead of queueing on one primary. Each bucket holds a share of the
allotment and the static fields; everything one join touches stays in one bucket:

- a shopper's **home bucket** (:func:`home`, by user id) holds its per-user count, first
  order, idempotency keys, rate limits and its reservations, so ``lua/reserve.lua`` checks
  the per-user limit exactly, in one script, as for a sale of one bucket;
- when the home bucket has too few units left, the join moves units into it from the other
  buckets (:func:`refill`: ``lua/bucket_give.lua`` on a giver, ``lua/bucket_take.lua`` on
  the home bucket), then tries once more. A transfer is logged on the giver until it is
  credited (idempotently) and dropped; a giver that dies in between leaves the log entry,
  which the sweeper finishes (:func:`finish_transfers`). So a unit is never in two
  buckets, and never lost;
- the sale is sold out when every bucket is empty; reconcile and the recount read every
  bucket; top-up and close apply to each bucket's share.

A recount (``consumers/recovery.py``) fences every bucket of the sale with one token,
recomputes the whole sale from PostgreSQL and the orders in flight, and re-arms each
bucket with its share under that token, the sale's new epoch: a transfer given before it
is never credited after it (the recount counted its units already).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast

from redis.asyncio import Redis

from flashsale.stores import rediskeys
from flashsale.stores.scripts import FlashScripts, Give, Take, parse_give

MAX_BUCKETS: Final = 64
_GOLDEN: Final = 0x9E3779B1  # Fibonacci hashing: consecutive user ids spread evenly


def home(user_id: int, buckets: int) -> int:
    """The bucket that holds ``user_id``'s count and reservations in a sale of ``buckets``."""
    if buckets <= 1:
        return 0
    return ((int(user_id) * _GOLDEN) & 0xFFFFFFFF) * buckets >> 32


def share(quantity: int, bucket: int, buckets: int) -> int:
    """Bucket ``bucket``'s share of ``quantity`` units (the shares add up to it)."""
    if buckets <= 1:
        return quantity
    return quantity // buckets + (1 if bucket < quantity % buckets else 0)


def spread(quantity: int, buckets: int) -> list[int]:
    return [share(quantity, k, buckets) for k in range(max(1, buckets))]


async def bucket_counts(redis: Redis, sale_ids: Iterable[int]) -> dict[int, int]:
    """How many buckets each sale has (bucket 0's ``buckets`` field; 1 when absent)."""
    ids = list(sale_ids)
    if not ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for sid in ids:
        pipe.hget(rediskeys.sale(sid), "buckets")
    found = cast(list[bytes | None], await pipe.execute())
    return {sid: int(n or 1) for sid, n in zip(ids, found, strict=True)}


@dataclass(frozen=True, slots=True)
class Refill:
    moved: int  # units credited to the home bucket
    every_bucket_empty: bool  # no bucket has a unit, none is in transit: sold out
    recovering: bool  # some bucket could not give: it waits for a recount
    in_transit: bool = False  # units given and not credited yet: there may be more soon


async def refill(
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    buckets: int,
    bucket: int,
    want: int,
) -> Refill:
    """Move at least ``want`` units (when there are) into ``bucket`` from the others.

    Givers are tried from a random one on, so that shoppers of many empty buckets do not
    all drain the same giver. Each giver gives ``want`` or half of what it has left,
    whichever is more, so a bucket rarely needs a second refill.
    """
    others = [k for k in range(buckets) if k != bucket]
    start = random.randrange(len(others))  # load spreading, not security
    moved = empty = 0
    recovering = in_transit = False
    seen: dict[int, int] = {}  # an empty giver's `moves` when it answered
    for giver in others[start:] + others[:start]:
        res = parse_give(
            await scripts.give(
                keys=rediskeys.give_keys(sale_id, giver), args=[giver, bucket, want - moved]
            )
        )
        status = res.status
        if status is Give.EMPTY:
            empty += 1
            seen[giver] = res.moves
            continue
        if status is Give.RECOVERING:
            recovering = True
            continue
        if status is Give.GIVING:
            in_transit = True
            continue
        units, transfer = res.units, res.transfer
        if await _credit(redis, scripts, sale_id, giver, bucket, transfer, units):
            moved += units
        else:
            in_transit = True  # the sweeper credits it once the home bucket is re-armed
        if moved >= want:
            break
    all_empty = empty == len(others)
    if all_empty and not await settled(redis, sale_id, seen, bucket):
        all_empty, in_transit = False, True  # units moved while the givers were asked
    return Refill(moved, all_empty, recovering, in_transit)


async def settled(redis: Redis, sale_id: int, seen: dict[int, int], bucket: int) -> bool:
    """Whether no unit was in transit while ``seen`` (bucket → its ``moves``) was read
    one bucket after another: none moved since, and ``bucket`` gives nothing away."""
    pipe = redis.pipeline(transaction=False)
    for k in seen:
        pipe.hget(rediskeys.sale(sale_id, k), "moves")
    pipe.hlen(rediskeys.transfers_out(sale_id, bucket))
    *now, giving = await pipe.execute()
    return not giving and all(
        int(m or 0) == before for m, before in zip(now, seen.values(), strict=True)
    )


async def _credit(
    redis: Redis,
    scripts: FlashScripts,
    sale_id: int,
    giver: int,
    bucket: int,
    transfer: str,
    units: int,
) -> bool:
    """Credit one transfer and drop it from the giver's log; True when it is credited.

    A receiver waiting for a recount keeps the entry (the sweeper tries again); a stale
    transfer (given before the last recount) is dropped: the recount counted its units.
    """
    result = Take(
        int(await scripts.take(keys=rediskeys.take_keys(sale_id, bucket), args=[transfer, units]))
    )
    if result is Take.RECOVERING:
        return False
    await redis.hdel(rediskeys.transfers_out(sale_id, giver), transfer)
    return result is not Take.STALE


async def _transfer_log(
    redis: Redis, sale_id: int, buckets: int
) -> list[tuple[int, str, int, int, int]]:
    """Every transfer not yet dropped by its giver: (giver, id, receiver, units, at ms)."""
    out = []
    for giver in range(buckets):
        entries = cast(
            dict[bytes, bytes], await redis.hgetall(rediskeys.transfers_out(sale_id, giver))
        )
        for raw_id, raw in entries.items():
            to, units, at = (int(x) for x in raw.split(b"|"))
            out.append((giver, raw_id.decode(), to, units, at))
    return out


async def finish_transfers(
    redis: Redis, scripts: FlashScripts, sale_id: int, buckets: int, *, older_than_ms: int
) -> int:
    """Credit transfers whose giver did not finish them (it died between the two steps, or
    the receiver was being recounted); returns how many units were credited."""
    cutoff = time.time_ns() // 1_000_000 - older_than_ms
    credited = 0
    for giver, transfer, to, units, at in await _transfer_log(redis, sale_id, buckets):
        if at <= cutoff and await _credit(redis, scripts, sale_id, giver, to, transfer, units):
            credited += units
    return credited


async def pending_transfers(redis: Redis, sale_id: int, buckets: int) -> int:
    """Units given by a bucket and not yet credited to another (for reconcile)."""
    pending = 0
    for _, transfer, to, units, _ in await _transfer_log(redis, sale_id, buckets):
        if not await redis.sismember(rediskeys.transfers_in(sale_id, to), transfer):
            pending += units
    return pending
