"""Typed application state keys: the one place that says what lives on the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from flashsale.settings import Settings

if TYPE_CHECKING:
    from flashsale.auth import PasswordHashing, TokenService
    from flashsale.stores.ids import OrderIds
    from flashsale.stores.kafka import OrderProducer
    from flashsale.stores.metrics import Metrics, RequestStats
    from gateway.streams import StreamSlots

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)
TOKENS: web.AppKey[TokenService] = web.AppKey("tokens")
PRODUCER: web.AppKey[OrderProducer] = web.AppKey("producer")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
ORDER_IDS: web.AppKey[OrderIds] = web.AppKey("order_ids")
REQUEST_STATS: web.AppKey[RequestStats] = web.AppKey("request_stats")
PASSWORD_HASHER: web.AppKey[PasswordHashing] = web.AppKey("password_hasher")
STREAMS: web.AppKey[StreamSlots] = web.AppKey("streams")

# Per-request state the access log reads: the order a join accepted (or replayed).
ORDER_ID = web.RequestKey("order_id", str)
