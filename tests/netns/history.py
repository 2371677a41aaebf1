"""Shoppers that record every request and its answer, and the checker that holds the stores
to those answers once the network is whole again.

A shopper joins once with its own Idempotency-Key and keeps that key for every retry: on
503 and 429 it retries at the same gateway, on a dropped or refused connection it moves to
the next gateway (as a load balancer would), until the answer is final (202, or a 409 that
says no). Its first 503 OUTCOME_UNKNOWN or dropped connection makes it an "unknown" shopper
whose later keyed answers the checker accounts as resolving that unknown.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from consumers import reconcile
from consumers.recovery import server_run_id
from flashsale.stores import rediskeys

FINAL_NO = {"SOLD_OUT", "INSUFFICIENT_STOCK", "SALE_ENDED"}
UNKNOWN = {"OUTCOME_UNKNOWN", "connection error"}

SQL_ORDERS = """
SELECT o.id, o.user_id, o.status, COALESCE(SUM(i.quantity), 0)::int AS units, COUNT(i.id) AS items
  FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
 WHERE o.flash_sale_id = $1
 GROUP BY o.id
"""


@dataclass
class Attempt:
    at: float
    gateway: str
    answer: str  # "202", "503 OUTCOME_UNKNOWN", "connection error", …


@dataclass
class Shopper:
    user_id: int
    token: str
    gateways: Sequence[str]  # base URLs, the first one its own
    quantity: int = 1
    attempts: list[Attempt] = field(default_factory=list)
    order_id: str | None = None  # the order a 202 (or LIMIT_EXCEEDED naming it) gave
    refused: str | None = None  # the final "no"

    @property
    def key(self) -> str:
        return f"netns-{self.user_id}"

    @property
    def final(self) -> bool:
        return self.order_id is not None or self.refused is not None

    @property
    def saw_unknown(self) -> bool:
        return any(a.answer.split(" ", 1)[-1] in UNKNOWN for a in self.attempts)


async def shop(
    shoppers: Sequence[Shopper],
    sale_id: int,
    *,
    per_second: float = 200.0,
    deadline_s: float = 120.0,
    concurrency: int = 100,
) -> None:
    """Every shopper joins until a final answer or the deadline."""
    limit = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + deadline_s

    async def one(http: aiohttp.ClientSession, s: Shopper) -> None:
        headers = {"Authorization": f"Bearer {s.token}", "Idempotency-Key": s.key}
        turn = 0
        while time.monotonic() < stop_at:
            base = s.gateways[turn % len(s.gateways)]
            url = f"{base}/api/v1/flash-sales/{sale_id}/join"
            try:
                async with (
                    limit,
                    http.post(url, json={"quantity": s.quantity}, headers=headers) as resp,
                ):
                    status = resp.status
                    body = await resp.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                s.attempts.append(Attempt(time.monotonic(), base, "connection error"))
                turn += 1
                await asyncio.sleep(0.2 + random.random() * 0.2)
                continue
            code = body.get("error") or ""
            s.attempts.append(Attempt(time.monotonic(), base, f"{status} {code}".strip()))
            if status == 202:
                s.order_id = body["data"]["order_id"]
                return
            data = body.get("data") or {}
            if status == 409 and code == "LIMIT_EXCEEDED" and data.get("order_id"):
                s.order_id = data["order_id"]  # an earlier attempt was a yes
                return
            if status == 409 and code in FINAL_NO:
                s.refused = code
                return
            if status in (429, 503):
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            raise AssertionError(f"unexpected answer {status} {body}")

    # a request that hangs across a partition is given up and retried (with its key)
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        tasks = []
        for s in shoppers:
            tasks.append(asyncio.create_task(one(http, s)))
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*tasks)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait for ``check()``; a timeout fails saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Verdict:
    case: str
    quantity: int
    accepted: int
    persisted: int
    lost: int
    oversold: int
    duplicates: int
    unknown: int
    unknown_yes: int
    unknown_no: int
    unknown_open: int
    converge_s: float
    answers: dict[str, int]
    back_on_sale: int = 0

    HEADER = (
        "| case | accepted | persisted | lost | oversold | duplicates "
        "| unknown outcomes (yes / no / open) | converged | back on sale after the crowd |"
    )

    def row(self) -> str:
        return (
            f"| {self.case} | {self.accepted} | {self.persisted} | {self.lost} | "
            f"{self.oversold} | {self.duplicates} | {self.unknown} "
            f"({self.unknown_yes} / {self.unknown_no} / {self.unknown_open}) | "
            f"{self.converge_s:.1f}s | {self.back_on_sale} |"
        )


async def _state(db: asyncpg.Pool, redis: Redis, sale_id: int) -> tuple[bool, str]:
    """Whether the sale has converged (nothing in flight, reconcile clean), and why not."""
    sale = await db.fetchrow("SELECT * FROM flash_sales WHERE id = $1", sale_id)
    assert sale is not None
    try:
        in_flight = 0
        for k in range(sale["buckets"]):
            in_flight += await redis.hlen(rediskeys.log(sale_id, k))
            in_flight += await redis.hlen(rediskeys.claimed(sale_id, k))
        run_id = await server_run_id(redis, sale_id)
        report = await reconcile.check_sale(db, redis, sale, run_id=run_id)
    except (RedisError, OSError) as exc:
        return False, f"redis: {exc!r}"
    if in_flight or not report.ok:
        return False, f"in flight {in_flight}; {report.line()}"
    return True, report.line()


async def judge(
    case: str,
    db: asyncpg.Pool,
    redis: Redis,
    sale_id: int,
    shoppers: list[Shopper],
    healed_at: float,
    *,
    per_user_limit: int = 1,
    converge_s: float = 90.0,
    late: Sequence[Shopper] = (),
) -> Verdict:
    """Wait (at most ``converge_s``) for the sale to converge, then check every promise
        against what the shoppers were told; prints the case's row. ``late`` shoppers then join
    to show that what was not sold is really on sale again. Any broken promise, or no
        convergence in time, fails with the state."""
    deadline = time.monotonic() + converge_s
    promised = {s.order_id: s for s in shoppers if s.order_id is not None}
    while True:
        ok, why = await _state(db, redis, sale_id)
        rows = await db.fetch(SQL_ORDERS, sale_id)
        if ok:  # nothing in flight: an accepted order not in PostgreSQL now never will be
            break
        if time.monotonic() > deadline:
            missing = sorted(set(promised) - {r["id"] for r in rows})
            raise AssertionError(
                f"{case}: not converged {converge_s}s after healing: {why}; "
                f"{len(missing)} accepted order(s) not in PostgreSQL: {missing[:10]}"
            )
        await asyncio.sleep(0.25)
    converged = time.monotonic() - healed_at
    sale = await db.fetchrow(
        "SELECT quantity, sold_quantity FROM flash_sales WHERE id = $1", sale_id
    )
    assert sale is not None
    by_id = {r["id"]: r for r in rows}
    answers: dict[str, int] = {}
    for s in shoppers:
        for a in s.attempts:
            answers[a.answer] = answers.get(a.answer, 0) + 1
    by_user: dict[int, list[asyncpg.Record]] = {}
    for r in rows:
        if r["status"] not in ("cancelled", "oversold"):
            by_user.setdefault(r["user_id"], []).append(r)
    lost = [oid for oid in promised if oid not in by_id]
    wrong = [
        oid
        for oid, s in promised.items()
        if oid in by_id
        and (by_id[oid]["user_id"] != s.user_id or by_id[oid]["units"] != s.quantity)
    ]
    told_twice = sum(1 for s in shoppers if s.order_id is not None) - len(promised)
    over_limit = {
        u: len(rs) for u, rs in by_user.items() if sum(r["units"] for r in rs) > per_user_limit
    }
    oversold = sum(1 for r in rows if r["status"] == "oversold")
    live_units = sum(r["units"] for rs in by_user.values() for r in rs)
    # an order no shopper was told about, or one a shopper was finally told "no" about
    unpromised = [r["id"] for r in rows if r["id"] not in promised and r["status"] != "cancelled"]
    refused_with_order = [s.user_id for s in shoppers if s.refused and s.user_id in by_user]
    unknowns = [s for s in shoppers if s.saw_unknown]
    remaining = 0
    buckets = int(await db.fetchval("SELECT buckets FROM flash_sales WHERE id = $1", sale_id))
    for k in range(buckets):
        remaining += int(await redis.hget(rediskeys.sale(sale_id, k), "remaining") or 0)
    verdict = Verdict(
        case=case,
        quantity=int(sale["quantity"]),
        accepted=sum(s.quantity for s in promised.values()),
        persisted=sum(1 for oid in promised if oid in by_id),
        lost=len(lost),
        oversold=oversold + max(0, live_units - int(sale["quantity"])),
        duplicates=told_twice + len(over_limit),
        unknown=len(unknowns),
        unknown_yes=sum(1 for s in unknowns if s.order_id is not None),
        unknown_no=sum(1 for s in unknowns if s.refused is not None),
        unknown_open=sum(1 for s in unknowns if not s.final),
        converge_s=converged,
        answers=answers,
    )
    state = f"{case}: {why}; answers {answers}"
    if late and not lost:  # every unit not sold is on sale again: late shoppers buy it
        await shop(late, sale_id, deadline_s=30)
        verdict.back_on_sale = sum(s.quantity for s in late if s.order_id is not None)
    print(f"\n{Verdict.HEADER}\n{verdict.row()}\nanswers: {answers}", flush=True)
    histories = [[a.answer for a in promised[oid].attempts] for oid in lost[:3]]
    assert not lost, f"accepted orders not in PostgreSQL: {lost[:10]}, told {histories} ({state})"
    assert not wrong, f"persisted with another user or quantity: {wrong[:10]} ({state})"
    assert verdict.oversold == 0, state
    assert verdict.duplicates == 0, f"told twice {told_twice}, over the limit {over_limit}"
    assert verdict.accepted <= verdict.quantity, state
    assert not refused_with_order, f"told no but holding an order: {refused_with_order[:10]}"
    assert not unpromised, f"orders nobody was told about: {unpromised[:10]} ({state})"
    open_ = [s.user_id for s in shoppers if not s.final]
    assert not open_, f"{len(open_)} shopper(s) never got a final answer ({state})"
    assert int(sale["sold_quantity"]) == live_units, (sale["sold_quantity"], live_units, state)
    assert remaining == verdict.quantity - live_units, (remaining, live_units, state)
    if late:
        assert verdict.back_on_sale == min(remaining, len(late)), (verdict.back_on_sale, remaining)
    return verdict
