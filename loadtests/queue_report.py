"""The waiting-room part of the invariant report, for a queued sale.

From Redis (the queue's keys) and PostgreSQL (the sale's orders):

- entered / admitted / joined / abandoned: shoppers in the queue, admitted to join, whose
  order is in PostgreSQL, whose admission window passed unused (accepted comes from the
  outcome files, as in the main report);
- joins without admission: orders of the sale by a shopper who never entered or whose
  position was never admitted (must be 0);
- lottery fairness: the rank correlation (Spearman) of arrival time and drawn position of
  the entrants before the start: near 0 when arriving early buys nothing;
- order kept: the rank correlation of position and order time among the shoppers who
  joined: near 1 when the queue's order is the order of the sales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from flashsale.stores import rediskeys


@dataclass(frozen=True, slots=True)
class QueueFigures:
    entered: int
    lottery_entrants: int
    admitted: int
    joined: int
    abandoned: int
    joins_without_admission: int
    lottery_rank_correlation: float | None
    order_rank_correlation: float | None

    @property
    def ok(self) -> bool:
        return self.joins_without_admission == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self, accepted: int) -> list[str]:
        def corr(v: float | None) -> str:
            return "n/a" if v is None else f"{v:+.3f}"

        return [
            f"queue          entered {self.entered} ({self.lottery_entrants} in the lottery), "
            f"admitted {self.admitted}, joined {self.joined} (orders in PG), accepted {accepted}, "
            f"abandoned {self.abandoned}",
            f"joins without admission {self.joins_without_admission}   (must be 0)",
            f"fairness       lottery: arrival vs position {corr(self.lottery_rank_correlation)} "
            f"(near 0); order kept: position vs order time {corr(self.order_rank_correlation)} "
            "(near +1)",
        ]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties ranked by order of appearance); None below 3."""
    n = len(xs)
    if n < 3:
        return None

    def ranks(vs: list[float]) -> list[int]:
        order = sorted(range(n), key=lambda i: vs[i])
        out = [0] * n
        for r, i in enumerate(order):
            out[i] = r
        return out

    rx, ry = ranks(xs), ranks(ys)
    d2 = sum((a - b) ** 2 for a, b in zip(rx, ry, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


def figures(
    entrants: dict[int, tuple[str, int, int]],
    lottery: list[int],
    admitted: int,
    abandoned: int,
    orders: list[tuple[int, float]],
) -> QueueFigures:
    """Pure: ``entrants`` user → (kind, position, entered ms), ``lottery`` the lottery's users
    in drawn order, ``orders`` (user, order time) of the sale's orders."""
    drawn = {u: i for i, u in enumerate(lottery, start=1)}

    def position(user: int) -> int | None:
        kind, pos, _ = entrants[user]
        return drawn.get(user) if kind == "L" else pos

    lot = [(entrants[u][2], p) for u, p in drawn.items() if u in entrants]
    joined = [(position(u), t) for u, t in orders if u in entrants]
    without = sum(1 for u, _ in orders if u not in entrants)
    without += sum(1 for p, _ in joined if p is None or p > admitted)
    kept = [(float(p), t) for p, t in joined if p is not None]
    return QueueFigures(
        entered=len(entrants),
        lottery_entrants=len(lottery),
        admitted=admitted,
        joined=len(joined),
        abandoned=abandoned,
        joins_without_admission=without,
        lottery_rank_correlation=spearman([float(a) for a, _ in lot], [float(p) for _, p in lot]),
        order_rank_correlation=spearman([p for p, _ in kept], [t for _, t in kept]),
    )


async def fetch(redis: Redis, sale_id: int, orders: list[tuple[int, float]]) -> QueueFigures:
    raw = await redis.hgetall(rediskeys.queue_entrants(sale_id))
    entrants: dict[int, tuple[str, int, int]] = {}
    for user, value in raw.items():
        kind, pos, at = (value.decode() if isinstance(value, bytes) else value).split("|")
        entrants[int(user)] = (kind, int(pos), int(at))
    members = await redis.zrange(rediskeys.queue_lottery(sale_id), 0, -1)
    lottery = [int(u) for u in members if isinstance(u, bytes | str)]
    q = await redis.hmget(rediskeys.queue(sale_id), "admitted", "abandoned")
    return figures(entrants, lottery, int(q[0] or 0), int(q[1] or 0), orders)


SQL_QUEUED = "SELECT mode FROM flash_sales WHERE id = $1"
SQL_ORDER_TIMES = """
SELECT user_id, extract(epoch FROM created_at)::float8 AS at FROM orders
WHERE flash_sale_id = $1 AND kind = 'flash'
"""


async def for_sale(dsn: str, redis_url: str | None, sale_id: int) -> QueueFigures | None:
    """The figures of a queued sale; None for an open one (or without a Redis URL)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval(SQL_QUEUED, sale_id) != "queued" or redis_url is None:
            return None
        orders = [
            (int(r["user_id"]), float(r["at"])) for r in await conn.fetch(SQL_ORDER_TIMES, sale_id)
        ]
    finally:
        await conn.close()
    redis: Redis = Redis.from_url(redis_url)
    try:
        return await fetch(redis, sale_id, orders)
    finally:
        await redis.aclose()
