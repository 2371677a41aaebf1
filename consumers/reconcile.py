"""``flashsale reconcile [--repair]`` and ``flashsale rebuild-cache``.

Units first (below), then money (:mod:`consumers.reconcile_money`: payments, refunds,
shipping and returns must add up); either kind of drift makes the command exit 1.

For every recent sale, the units must add up across the two stores:

    quantity (PG) = remaining + reservations in the log + claimed-not-yet-written
                    + live persisted units (PG) + cancelled-not-yet-returned (PG)
                    + moved_out (Redis: on the way back to the SKU)

and every user's count in Redis must equal that user's live and in-flight units. A line
also names what needs a person: a claim older than ``FLASHSALE_CLAIM_STALE_S`` whose order
is not written (its consumer died; the sweeper republishes it), orders written as
``oversold`` (a unit promised twice), and a sale not armed under the current Redis run
(joins answer SALE_RECOVERING until the recovery sweeper recounts it).

``--repair`` republishes stale claims and recounts drifting sales the way the recovery
sweeper does (fence, wait for in-flight publishes, recount from PostgreSQL, the broker's
unconsumed events and Redis, re-arm): safe while the gateway and consumers run.
``rebuild-cache`` does the same for every recent sale (after Redis was lost or flushed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final, cast

import asyncpg
from redis.asyncio import Redis

from consumers.reconcile_money import check_money
from consumers.recovery import SQL_RECENT_SALES, Recovery, server_run_id
from consumers.sweepers import republish_stale_claims
from flashsale.flash import buckets
from flashsale.flash.events import parse_entry
from flashsale.settings import Settings
from flashsale.stores import rediskeys
from flashsale.stores.db import create_pool
from flashsale.stores.kafka import OrderProducer
from flashsale.stores.metrics import get_metrics
from flashsale.stores.redisclient import open_redis, run_ids
from flashsale.timing import DRIFT_KEPT_S, REARM_LEASE_MS, REBUILD_POLL_S, RECENT_SALES_DAYS

log = logging.getLogger(__name__)

SQL_UNITS_BY_USER = """
SELECT o.user_id, o.status, o.flash_units_returned, count(DISTINCT o.id)::int AS orders,
       sum(i.quantity)::int AS units
FROM orders o JOIN order_items i ON i.order_id = o.id
WHERE o.flash_sale_id = $1
GROUP BY o.user_id, o.status, o.flash_units_returned
"""
SQL_EXISTING = "SELECT id FROM orders WHERE id = ANY($1::text[])"


@dataclass
class SaleReport:
    sale_id: int
    quantity: int
    remaining: int | None
    in_log: int
    claimed: int
    live: int
    pending_return: int
    moved_out: int
    user_drift: dict[int, tuple[int, int]] = field(default_factory=dict)
    stale_claims: int = 0
    oversold: int = 0
    armed: bool = True
    in_transit: int = 0  # given by one bucket of a split sale, not yet credited to another
    buckets: int = 1

    @property
    def drift(self) -> int:
        counted = (
            (self.remaining or 0)
            + self.in_transit
            + self.in_log
            + self.claimed
            + self.live
            + self.pending_return
            + self.moved_out
        )
        return self.quantity - counted

    @property
    def ok(self) -> bool:
        return (
            self.drift == 0
            and not self.user_drift
            and self.remaining is not None
            and not self.stale_claims
            and not self.oversold
            and self.armed
        )

    @property
    def recovering(self) -> bool:
        """Fenced and waiting for the recovery to recount it (after a Redis restart or
        failover): its counters are not the live ones yet, so their sum says nothing."""
        return not self.armed and self.remaining is not None and not self.oversold

    def line(self) -> str:
        state = "OK" if self.ok else "RECOVERING" if self.recovering else "DRIFT"
        users = f", users off: {len(self.user_drift)}" if self.user_drift else ""
        if self.stale_claims:
            users += f", stale claims: {self.stale_claims}"
        if self.oversold:
            users += f", OVERSOLD orders: {self.oversold}"
        if self.recovering:
            users += " (not armed under this Redis run: the recovery recounts it within seconds)"
        redis_state = (
            "missing in Redis" if self.remaining is None else f"remaining={self.remaining}"
        )
        if self.buckets > 1:
            redis_state += f" buckets={self.buckets} in_transit={self.in_transit}"
        return (
            f"sale {self.sale_id}: {state} quantity={self.quantity} {redis_state} "
            f"log={self.in_log} claimed={self.claimed} live={self.live} "
            f"pending_return={self.pending_return} moved_out={self.moved_out} "
            f"drift={self.drift}{users}"
        )


def _entry_units(entries: dict[bytes, bytes]) -> tuple[int, dict[int, int]]:
    total = 0
    per_user: dict[int, int] = defaultdict(int)
    for oid, raw in entries.items():
        ev = parse_entry(0, oid.decode(), raw)
        total += ev.quantity
        per_user[ev.user_id] += ev.quantity
    return total, per_user


# Exit codes: 0 every sale checked out; DRIFT_EXIT some sale drifts (or is oversold);
# RECOVERING_EXIT none drifts but some are still being recounted (try again shortly).
DRIFT_EXIT: Final = 1
RECOVERING_EXIT: Final = 3


async def check_sale(
    db: asyncpg.Pool,
    redis: Redis,
    sale: asyncpg.Record,
    *,
    claim_stale_s: int = 30,
    run_id: str | None = None,
) -> SaleReport:
    """One sale's units across the two stores; every bucket of a split sale added up,
    with the units in transfer between them. ``run_id``: the run id of the server holding
    bucket 0, to report a sale that is not armed (each other bucket's is looked up)."""
    sid = sale["id"]
    n = int(sale["buckets"])
    h: dict[bytes, bytes] = {}
    log_entries: dict[bytes, bytes] = {}
    claimed_entries: dict[bytes, bytes] = {}
    claim_times: dict[bytes, float] = {}
    redis_users: dict[int, int] = defaultdict(int)
    remaining: int | None = 0
    moved_out = 0
    armed = True
    runs = [run_id, *await run_ids(redis, [rediskeys.sale(sid, k) for k in range(1, n)])]
    for k in range(n):
        hk = cast(dict[bytes, bytes], await redis.hgetall(rediskeys.sale(sid, k)))
        if k == 0:
            h = hk
        if not hk or remaining is None:
            remaining = None
        else:
            remaining += int(hk[b"remaining"])
            moved_out += int(hk.get(b"moved_out", b"0"))
        if run_id is not None and hk.get(b"armed") != (runs[k] or "").encode():
            armed = False
        log_entries |= cast(dict[bytes, bytes], await redis.hgetall(rediskeys.log(sid, k)))
        claimed_entries |= cast(dict[bytes, bytes], await redis.hgetall(rediskeys.claimed(sid, k)))
        claim_times |= dict(
            cast(
                list[tuple[bytes, float]],
                await redis.zrange(rediskeys.claim_times(sid, k), 0, -1, withscores=True),
            )
        )
        for raw_user, raw_units in (await redis.hgetall(rediskeys.users(sid, k))).items():
            redis_users[int(raw_user)] += int(raw_units)
    in_transit = await buckets.pending_transfers(redis, sid, n) if n > 1 else 0
    if claimed_entries:  # written to PostgreSQL but the claim not dropped yet: count once
        written = {
            r["id"] for r in await db.fetch(SQL_EXISTING, [k.decode() for k in claimed_entries])
        }
        claimed_entries = {k: v for k, v in claimed_entries.items() if k.decode() not in written}
    cutoff = time.time() * 1000 - claim_stale_s * 1000
    stale = sum(1 for k in claimed_entries if claim_times.get(k, 0) <= cutoff)
    in_log, log_users = _entry_units(log_entries)
    claimed, claimed_users = _entry_units(claimed_entries)
    live = pending = oversold = 0
    expected_users: dict[int, int] = defaultdict(int)
    for r in await db.fetch(SQL_UNITS_BY_USER, sid):
        if r["status"] == "oversold":
            oversold += r["orders"]
        elif r["status"] != "cancelled":
            live += r["units"]
            expected_users[r["user_id"]] += r["units"]
        elif not r["flash_units_returned"]:
            pending += r["units"]
            expected_users[r["user_id"]] += r["units"]
    for users in (log_users, claimed_users):
        for uid, units in users.items():
            expected_users[uid] += units
    user_drift = {
        uid: (redis_users.get(uid, 0), expected_users.get(uid, 0))
        for uid in set(redis_users) | set(expected_users)
        if redis_users.get(uid, 0) != expected_users.get(uid, 0)
    }
    report = SaleReport(
        sale_id=sid,
        quantity=sale["quantity"],
        remaining=remaining,
        in_log=in_log,
        claimed=claimed,
        live=live,
        pending_return=pending,
        moved_out=moved_out if h else 0,
        user_drift=user_drift if h else {},
        stale_claims=stale,
        oversold=oversold,
        armed=armed,
        in_transit=in_transit,
        buckets=n,
    )
    get_metrics().drift.labels(str(sid)).set(abs(report.drift))
    # reconcile is a command of its own: the dashboard of any host reads the last result here
    await redis.set(rediskeys.dash_drift(sid), abs(report.drift), ex=DRIFT_KEPT_S)
    return report


def verdict(reports: list[SaleReport]) -> tuple[int, str]:
    """The exit code and the summary line: a sale still being recounted is no drift."""
    recovering = sum(r.recovering for r in reports)
    drifting = sum(not r.ok and not r.recovering for r in reports)
    summary = f"{len(reports)} sale(s) checked, {drifting} with drift"
    if recovering:
        summary += f", {recovering} recovering (run it again in a few seconds)"
    if drifting:
        return DRIFT_EXIT, summary
    return (RECOVERING_EXIT if recovering else 0), summary


async def run(settings: Settings, command: str, repair: bool) -> int:
    db = await create_pool(settings.database, min_size=1, max_size=4)
    redis: Redis = open_redis(settings)
    try:
        recovery = Recovery(settings, db, redis, get_metrics())
        if command == "rebuild-cache":
            return await _rebuild_cache(recovery)
        sales = await db.fetch(SQL_RECENT_SALES, RECENT_SALES_DAYS)
        reports: list[SaleReport] = []
        for sale in sales:
            run_id = await server_run_id(redis, sale["id"])
            report = await check_sale(
                db, redis, sale, claim_stale_s=settings.claim_stale_s, run_id=run_id
            )
            print(report.line())
            for uid, (have, want) in sorted(report.user_drift.items())[:20]:
                print(f"    user {uid}: redis={have} expected={want}")
            reports.append(report)
        code, summary = verdict(reports)
        print(summary)
        bad = [r for r in reports if not r.ok and not r.recovering]
        if bad and repair:
            await _repair(settings, db, redis, recovery, bad)
        money = await check_money(db, redis, [s["id"] for s in sales])
        for line in money.lines():
            print(line)
        if not money.ok:  # money needs a person: --repair does not touch it
            print("money: DRIFT (see the checks above)")
            return DRIFT_EXIT
        if bad and repair:
            return 0
        return code
    finally:
        await redis.aclose()
        await db.close()


async def _rebuild_cache(recovery: Recovery) -> int:
    """Fence and recount every recent sale; returns 0 once each is armed again.

    A consumer's recovery sweeper may be recounting a sale of several buckets at the same
    moment (it holds that sale's lease, and this pass skips it): the command waits for
    the sweeper's recount rather than report a cache that is not rebuilt yet. Only the
    first pass is forced (its sales were fenced and waited for above); a sale it still
    finds fenced later waits its own grace first, as the sweeper's does, so that a sale
    fenced meanwhile (a failover) is not recounted before its in-flight publishes land.
    """
    fenced = await recovery.fence_all()
    print(f"{fenced} sale(s) fenced; recounting after {recovery.grace_s:.0f}s")
    await asyncio.sleep(recovery.grace_s)
    armed = await recovery.run_once(force=True)
    deadline = time.monotonic() + REARM_LEASE_MS / 1000 + recovery.grace_s
    while waiting := (await recovery.fenced())[1]:
        if time.monotonic() > deadline:
            ids = ", ".join(str(s["id"]) for s in waiting)
            print(f"{armed} sale(s) re-armed; still not armed: {ids} (run it again)")
            return RECOVERING_EXIT
        await asyncio.sleep(REBUILD_POLL_S)
        armed += await recovery.run_once()
    print(f"{armed} sale(s) re-armed here; every recent sale is armed")
    return 0


async def _repair(
    settings: Settings, db: asyncpg.Pool, redis: Redis, recovery: Recovery, bad: list[SaleReport]
) -> None:
    if any(r.stale_claims for r in bad):
        async with OrderProducer(settings) as producer:
            n = await republish_stale_claims(settings, db, redis, producer, get_metrics())
        print(f"    repaired: {n} stale claim(s) republished")
    recount = [r for r in bad if r.drift or r.user_drift or r.remaining is None or not r.armed]
    if recount:
        pipe = redis.pipeline(transaction=False)
        for r in recount:  # bucket 0 of a split sale: the recount fences every bucket
            pipe.hdel(rediskeys.sale(r.sale_id), "armed")
        await pipe.execute()
        print(f"    {len(recount)} sale(s) fenced; recounting after {recovery.grace_s:.0f}s")
        await asyncio.sleep(recovery.grace_s)
        print(f"    repaired: {await recovery.run_once(force=True)} sale(s) re-armed")
    for r in bad:
        if r.oversold:
            print(
                f"    sale {r.sale_id}: {r.oversold} oversold order(s) need a person: "
                "they were never payable; tell their shoppers"
            )


def main(settings: Settings, *, command: str, repair: bool) -> int:
    return asyncio.run(run(settings, command, repair))
