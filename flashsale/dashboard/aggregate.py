"""Every process's published figures summed: running totals, rates, join latency."""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from flashsale.dashboard.totals import (
    LATENCY_FIELD,
    Totals,
    add_counters,
    add_gauges,
    decode_fields,
)
from flashsale.stores.rediskeys import DASH_TOTALS, dash_second
from flashsale.timing import DASH_GAUGE_FRESH_S, DASH_LATENCY_WINDOW_S, DASH_RATE_WINDOW_S


@dataclass(slots=True)
class Aggregate:
    """What every process published: running totals, the last seconds' sums."""

    totals: Totals  # counters since the totals began; gauges as last published
    recent: Totals  # counters summed over the last DASH_RATE_WINDOW_S complete seconds
    latency: dict[float, float]  # join latency bins summed over DASH_LATENCY_WINDOW_S
    processes: int  # processes that published in the last DASH_GAUGE_FRESH_S seconds


async def read_aggregate(redis: Redis, second: int) -> Aggregate:
    """Every process's figures as of ``second`` (the seconds before it are complete)."""
    seconds = list(range(second - DASH_LATENCY_WINDOW_S, second + 1))
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(DASH_TOTALS)
    for s in seconds:
        pipe.hgetall(dash_second(s))
    totals_raw, *seconds_raw = await pipe.execute()
    totals = Totals()
    add_counters(totals, decode_fields(totals_raw))
    recent, window = Totals(), Totals()
    latest: dict[str, float] = {}
    for s, raw in zip(seconds, seconds_raw, strict=True):
        fields = decode_fields(raw)
        if s < second:  # the current second is still being written
            add_counters(window, {k: v for k, v in fields.items() if k.startswith(LATENCY_FIELD)})
            if s >= second - DASH_RATE_WINDOW_S:
                add_counters(recent, fields)
        if s >= second - DASH_GAUGE_FRESH_S:
            latest.update({k: v for k, v in fields.items() if "|" in k})  # newer wins
    add_gauges(totals, latest)
    processes = len({k.partition("|")[2] for k in latest})
    return Aggregate(totals, recent, window.join_bins, processes)


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
