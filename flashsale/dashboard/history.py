"""A sale's last five minutes of snapshots, one point a second, kept in a Redis list."""

from __future__ import annotations

from typing import Any, Final

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from flashsale.stores import rediskeys
from flashsale.timing import DASH_HISTORY_S

HISTORY_POINTS: Final = DASH_HISTORY_S  # one snapshot a second


def decode(raw: bytes | str | None) -> dict[str, Any] | None:
    """A snapshot or a history point as stored (JSON), or None."""
    if raw is None:
        return None
    value: dict[str, Any] = orjson.loads(raw)
    return value


async def read(redis: Redis, sale_id: int) -> list[dict[str, Any]]:
    """The sale's points, oldest first."""
    raw = await redis.lrange(rediskeys.dash_history(sale_id), 0, -1)
    return [point for point in (decode(r) for r in raw) if point is not None]


def append(pipe: Pipeline, sale_id: int, snap: dict[str, Any]) -> None:
    """Queue the snapshot's point (without its running totals) on ``pipe``."""
    key = rediskeys.dash_history(sale_id)
    pipe.rpush(key, orjson.dumps({k: v for k, v in snap.items() if k != "totals"}))
    pipe.ltrim(key, -HISTORY_POINTS, -1)
    pipe.expire(key, DASH_HISTORY_S)
